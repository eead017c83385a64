/* Minimal C host for libllama: load a model, stream one chat answer, print tokens/s.
 * Build: cc -std=c11 -Wall -Wextra -Werror chat.c $(pkg-config --cflags --libs llama-core)
 * Run:   ./chat MODEL.gguf "Your question" */
#include <llama.h>

#include <stdio.h>
#include <string.h>

static bool print_piece(const char *piece, size_t len, int32_t token, void *user_data) {
    (void)token;
    (void)user_data;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return true;
}

static int fail(const char *what, llama_status st) {
    fprintf(stderr, "%s: %s: %s\n", what, llama_status_str(st), llama_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL QUESTION\n", argv[0]);
        return 2;
    }
    llama_model *model = NULL;
    llama_status st = llama_model_load(argv[1], NULL, &model);
    if (st != LLAMA_STATUS_OK) return fail("load", st);

    llama_session *session = NULL;
    st = llama_session_new(model, NULL, &session);
    if (st != LLAMA_STATUS_OK) {
        llama_model_free(model);
        return fail("session", st);
    }
    llama_sampler_params sp = llama_sampler_params_default();
    sp.temperature = 0.7f;
    sp.has_seed = true;
    sp.seed = 7;
    llama_sampler *sampler = NULL;
    st = llama_sampler_new(&sp, &sampler);
    if (st != LLAMA_STATUS_OK) {
        llama_session_free(session);
        llama_model_free(model);
        return fail("sampler", st);
    }
    llama_chat_message messages[1] = {{"user", argv[2]}};
    llama_generate_params gp = llama_generate_params_default();
    gp.max_tokens = 128;
    llama_generation_info info;
    st = llama_session_chat(session, sampler, messages, 1, &gp, print_piece, NULL, &info);
    printf("\n");
    int rc = 0;
    if (st != LLAMA_STATUS_OK) {
        rc = fail("chat", st);
    } else {
        fprintf(stderr, "[%zu tokens, %.1f tok/s]\n", info.n_generated,
                info.generation_ms > 0 ? 1000.0 * (double)info.n_generated / info.generation_ms : 0.0);
    }
    llama_sampler_free(sampler);
    llama_session_free(session);
    llama_model_free(model);
    return rc;
}

/* Structured output from C: the reply to one chat question, constrained.
 * Build: cc -std=c11 -Wall -Wextra -Werror structured.c $(pkg-config --cflags --libs llama-core)
 * Run:   ./structured MODEL KIND "Your question" < CONSTRAINT
 *        KIND: json_schema, json_object, lark, gbnf, grammar, regex, choices (one per line)
 * Prints the reply on stdout and the stop reason on stderr. */
#include <llama.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool print_piece(const char *piece, size_t len, int32_t token, void *user_data) {
    (void)token;
    (void)user_data;
    fwrite(piece, 1, len, stdout);
    return true;
}

static char *read_stdin(void) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, stdin)) > 0) {
        n += got;
        if (cap - n - 1 == 0) {
            char *bigger = realloc(buf, cap * 2);
            if (!bigger) {
                free(buf);
                return NULL;
            }
            buf = bigger;
            cap *= 2;
        }
    }
    buf[n] = 0;
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL KIND QUESTION < CONSTRAINT\n", argv[0]);
        return 2;
    }
    static const struct {
        const char *name;
        int32_t kind;
    } kinds[] = {
        {"json_schema", LLAMA_CONSTRAINT_KIND_JSON_SCHEMA}, {"json_object", LLAMA_CONSTRAINT_KIND_JSON_OBJECT},
        {"lark", LLAMA_CONSTRAINT_KIND_LARK},               {"gbnf", LLAMA_CONSTRAINT_KIND_GBNF},
        {"grammar", LLAMA_CONSTRAINT_KIND_GRAMMAR},         {"regex", LLAMA_CONSTRAINT_KIND_REGEX},
        {"choices", LLAMA_CONSTRAINT_KIND_CHOICES},
    };
    llama_generate_params gp = llama_generate_params_default();
    gp.max_tokens = 200;
    bool known = false;
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        if (strcmp(argv[2], kinds[i].name) == 0) {
            gp.constraint_kind = kinds[i].kind;
            known = true;
        }
    }
    if (!known) {
        fprintf(stderr, "unknown constraint kind %s\n", argv[2]);
        return 2;
    }
    char *constraint = read_stdin();
    if (!constraint) return 1;
    gp.constraint = constraint;

    int rc = 1;
    llama_model *model = NULL;
    llama_session *session = NULL;
    llama_sampler *sampler = NULL;
    llama_sampler_params sp = llama_sampler_params_default();
    sp.temperature = 0.0f;
    llama_status st = llama_model_load(argv[1], NULL, &model);
    if (st == LLAMA_STATUS_OK) st = llama_session_new(model, NULL, &session);
    if (st == LLAMA_STATUS_OK) st = llama_sampler_new(&sp, &sampler);
    llama_generation_info info;
    if (st == LLAMA_STATUS_OK) {
        llama_chat_message messages[1] = {{"user", argv[3]}};
        st = llama_session_chat(session, sampler, messages, 1, &gp, print_piece, NULL, &info);
    }
    if (st == LLAMA_STATUS_OK) {
        static const char *reasons[] = {"max_tokens", "eog", "stop_string", "callback",
                                        "cancelled", "grammar", "grammar_incomplete"};
        fprintf(stderr, "stop: %s\n", reasons[info.stop_reason]);
        rc = 0;
    } else {
        fprintf(stderr, "error: %s: %s\n", llama_status_str(st), llama_last_error_message());
    }
    llama_sampler_free(sampler);
    llama_session_free(session);
    llama_model_free(model);
    free(constraint);
    return rc;
}

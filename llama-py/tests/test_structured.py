"""Structured output through all three faces (Python, the CLI, C): every output of 22 JSON
schemas parses and validates with `jsonschema`, and the three faces give the same text; plus
grammars, regexes, choices, tool calls and the errors of bad constraints."""

import json
import os
import pathlib
import re
import subprocess

import jsonschema
import pytest

import llama_core

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMAS = json.loads((ROOT / "tests" / "fixtures" / "schemas.json").read_text())


def _validate(text: str, schema: dict) -> None:
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(value)


def _python(model, case) -> str:
    with model.session() as s:
        rf = {"type": "json_schema", "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True}}
        text = s.chat(
            [{"role": "user", "content": case["prompt"]}],
            max_tokens=200,
            sampler=llama_core.Sampler.greedy(),
            response_format=rf,
        )
        assert s.last_generation["stop_reason"] == "grammar", (case["name"], text)
        return text


def _cli(model_path, case) -> str:
    out = subprocess.run(
        [os.environ["LLAMA_BIN"], "chat", "-m", model_path, "-p", case["prompt"], "--temperature", "0",
         "-n", "200", "--json", "--json-schema", json.dumps(case["schema"])],
        capture_output=True, text=True, check=True,
    )
    d = json.loads(out.stdout)
    assert d["stop_reason"] == "grammar", (case["name"], d["text"])
    return d["text"]


def _c(model_path, case) -> str:
    exe = os.environ["LLAMA_C_STRUCTURED"]
    out = subprocess.run([exe, model_path, "json_schema", case["prompt"]], input=json.dumps(case["schema"]),
                         capture_output=True, text=True, check=True)
    assert "stop: grammar" in out.stderr, (case["name"], out.stdout, out.stderr)
    return out.stdout


def test_there_are_enough_schemas():
    assert len(SCHEMAS) >= 20
    kinds = json.dumps(SCHEMAS)
    for needed in ["anyOf", "oneOf", "enum", "pattern", "format", "minItems", "maxItems", "minimum", "$ref"]:
        assert needed in kinds, needed


@pytest.mark.parametrize("case", SCHEMAS, ids=[c["name"] for c in SCHEMAS])
def test_schema_outputs_validate_in_every_face(model, model_path, case):
    py = _python(model, case)
    _validate(py, case["schema"])
    cli = _cli(model_path, case)
    _validate(cli, case["schema"])
    c = _c(model_path, case)
    _validate(c, case["schema"])
    # Greedy on the same conversation: the faces agree to the byte.
    assert py == cli == c, (py, cli, c)


def test_sampled_outputs_validate(model):
    case = next(c for c in SCHEMAS if c["name"] == "array_of_objects")
    for seed in range(3):
        with model.session() as s:
            text = s.chat([{"role": "user", "content": case["prompt"]}], max_tokens=200,
                          sampler=llama_core.Sampler(temperature=1.0, seed=seed),
                          response_format={"type": "json_schema", "json_schema": {"schema": case["schema"]}})
            _validate(text, case["schema"])


def test_json_object_grammar_regex_choices(model):
    greedy = llama_core.Sampler.greedy()
    with model.session() as s:
        text = s.chat([{"role": "user", "content": "Give me a JSON object about a cat."}],
                      sampler=greedy, response_format={"type": "json_object"}, max_tokens=120)
        if s.last_generation["stop_reason"] == "grammar":
            assert isinstance(json.loads(text), dict)
        else:
            assert s.last_generation["stop_reason"] == "grammar_incomplete"
            assert text.startswith("{")
    gbnf = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]{1,3} | "(" expr ")"\n'
    with model.session() as s:
        text = s.chat([{"role": "user", "content": "Write a sum."}], sampler=greedy, grammar=gbnf, max_tokens=30)
        assert re.fullmatch(r"[0-9()+\-]+", text), text
    with model.session() as s:
        text = s.generate("My phone number is", regex=r" [0-9]{3}-[0-9]{4}", sampler=greedy)
        assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", text), text
    with model.session() as s:
        pieces = list(s.chat_stream([{"role": "user", "content": "Is ice cold?"}], choices=["yes", "no"],
                                    sampler=greedy))
        assert "".join(pieces) in ("yes", "no")


def test_tool_call_round_trip(model):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"]}}}]
    greedy = llama_core.Sampler.greedy()
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    with model.session() as s:
        s.chat(msgs, sampler=greedy, tools=tools, tool_choice="required", max_tokens=60)
        calls = s.last_generation["tool_calls"]
        assert len(calls) == 1 and calls[0]["name"] == "get_weather", calls
        jsonschema.validate(calls[0]["arguments"], tools[0]["function"]["parameters"])
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(calls[0]["arguments"])}}]})
        msgs.append({"role": "tool", "content": '{"temperature": 21}'})
        reply = s.chat(msgs, sampler=greedy, tools=tools, tool_choice="none", max_tokens=40)
        assert reply.strip() and s.last_generation["tool_calls"] == []
    with model.session() as s:
        s.chat([{"role": "user", "content": "Weather in Oslo?"}], sampler=greedy, tools=tools,
               tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60)
        assert s.last_generation["tool_calls"][0]["name"] == "get_weather"


def test_bad_constraints_raise_before_generation(model):
    with model.session() as s:
        for kwargs in [
            {"grammar": "root ::= [a"},
            {"grammar": "start: undefined_rule"},
            {"regex": "(unclosed"},
            {"choices": []},
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
        ]:
            with pytest.raises(llama_core.ConstraintError):
                s.chat([{"role": "user", "content": "hi"}], **kwargs)
            assert len(s) == 0, kwargs
        with pytest.raises(ValueError):
            s.chat([{"role": "user", "content": "hi"}], regex="a", choices=["a"])
        with pytest.raises(ValueError):
            s.chat([{"role": "user", "content": "hi"}], response_format={"type": "xml"})
        with pytest.raises(ValueError):
            s.chat([{"role": "user", "content": "hi"}], response_format={"type": "json_schema", "json_schema": {"schema": {1, 2}}})
        with pytest.raises(ValueError):
            s.chat([{"role": "user", "content": "hi"}], tools=[{"type": "function"}])
        with pytest.raises(ValueError):
            s.chat([{"role": "user", "content": "hi"}], tools=[], tool_choice="required")
        with pytest.raises(TypeError):
            s.chat([{"role": "user", "content": "hi"}], grammar=42)
        # Every entry point reads the same keywords: one it does not take is a TypeError
        # naming it (tools belong to conversations), as is a value of the wrong type.
        with pytest.raises(TypeError, match="unexpected keyword argument 'grammer'"):
            s.generate("hi", grammer="root ::= \"a\"")
        with pytest.raises(TypeError, match="stream\\(\\) got an unexpected keyword argument 'tools'"):
            s.stream("hi", tools=[])
        with pytest.raises(TypeError, match="choices"):
            s.chat_stream([{"role": "user", "content": "hi"}], choices="ab")
        with pytest.raises(TypeError, match="parse_special_in_content"):
            llama_core.Batch(model).add("hi", parse_special_in_content="yes")
        with pytest.raises(TypeError, match="unexpected keyword argument 'regexp'"):
            model.generate_batch(["hi"], regexp="a")
        assert len(s) == 0

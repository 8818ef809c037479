"""The fake Ollama server, checked through the real `ollama` client (and raw HTTP for the wire)."""
import json
import os
import sys
import time

import httpx
import ollama
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_ollama import (FakeOllama, Model, content_tool_call, delay, error, parse_tool_output,  # noqa: E402
                         server_down, text, tool_call, tool_calls)

MODEL = "qwen2.5-coder:7b"       # its template wraps tool calls in <tool_call> tags
LLAMA = "llama3.1:8b"            # its template writes them as bare JSON
TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "edit_file", "description": "Replace old_text by new_text.",
        "parameters": {"type": "object", "required": ["path", "old_text", "new_text"], "properties": {
            "path": {"type": "string"}, "old_text": {"type": "string"}, "new_text": {"type": "string"}}}}},
]
RUN_TOOL = {"type": "function", "function": {
    "name": "run_experiment", "description": "Run it.",
    "parameters": {"type": "object", "properties": {"description": {"type": "string"}}, "required": ["description"]}}}
USER = [{"role": "user", "content": "Improve train.py."}]
USER_TOKENS = 17 // 4 + 4     # the fake's documented count: characters / 4 + 4 a message ("Improve train.py." is 17)


def client(fake, **kw):
    return ollama.Client(host=fake.url, **kw)


def test_chat_text_non_streaming():
    with FakeOllama({MODEL: 32768}, [text("Let me look at train.py first.")]) as fake:
        r = client(fake).chat(MODEL, USER, options={"num_ctx": 16384, "temperature": 0.2}, keep_alive="30m")
        assert r.message.role == "assistant"
        assert r.message.content == "Let me look at train.py first."
        assert not r.message.tool_calls
        assert r.done and r.done_reason == "stop"
        sent = fake.chat_requests[0]
        assert r.prompt_eval_count == USER_TOKENS
        assert r.eval_count > 0 and r.eval_duration > 0 and r.total_duration >= r.load_duration > 0
        assert sent["model"] == MODEL and sent["stream"] is False and sent["keep_alive"] == "30m"
        assert sent["options"] == {"num_ctx": 16384, "temperature": 0.2}
        assert sent["messages"] == USER
        assert fake.remaining == 0


def test_native_tool_call_arguments_are_a_dict():
    args = {"path": "train.py", "old_text": "LR = 1e-3", "new_text": "LR = 3e-4"}
    with FakeOllama({MODEL: 32768}, [tool_call("edit_file", args)]) as fake:
        r = client(fake).chat(MODEL, USER, tools=TOOLS, options={"num_ctx": 16384})
        call = r.message.tool_calls[0]
        assert call.function.name == "edit_file"
        assert call.function.arguments == args and isinstance(call.function.arguments, dict)
        assert r.message.content == ""
        assert [t["function"]["name"] for t in fake.chat_requests[0]["tools"]] == ["read_file", "edit_file"]


def test_tool_call_wire_format_matches_server():
    # api.ToolCall of Ollama 0.12: {"function": {"index", "name", "arguments"}}, no id, and index is omitempty
    with FakeOllama({MODEL: 32768}, [tool_calls(("read_file", {"path": "train.py"}),
                                                ("read_file", {"path": "program.md"}))]) as fake:
        body = httpx.post(fake.url + "/api/chat", json={"model": MODEL, "messages": USER, "tools": TOOLS,
                                                        "stream": False}).json()
    assert set(body) >= {"model", "created_at", "message", "done", "done_reason", "total_duration",
                         "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                         "eval_duration"}
    assert body["message"]["tool_calls"] == [
        {"function": {"name": "read_file", "arguments": {"path": "train.py"}}},
        {"function": {"index": 1, "name": "read_file", "arguments": {"path": "program.md"}}}]
    assert body["message"]["content"] == ""
    assert body["created_at"].endswith("Z")


def test_streaming_chunks_reassemble():
    reply = "I will lower the learning rate because the loss plateaus early."
    with FakeOllama({MODEL: 32768}, [text(reply), tool_call("read_file", path="train.py")]) as fake:
        c = client(fake)
        parts = list(c.chat(MODEL, USER, stream=True, options={"num_ctx": 8192}))
        assert len(parts) > 5
        assert all(not p.done for p in parts[:-1]) and parts[-1].done
        assert "".join(p.message.content for p in parts) == reply
        last = parts[-1]
        assert last.done_reason == "stop" and last.message.content == ""
        assert last.prompt_eval_count == USER_TOKENS and last.eval_count > 0
        assert all(p.prompt_eval_count is None for p in parts[:-1])

        parts = list(c.chat(MODEL, USER, tools=TOOLS, stream=True))
        calls = [tc for p in parts for tc in (p.message.tool_calls or [])]
        assert [(tc.function.name, tc.function.arguments) for tc in calls] == [("read_file", {"path": "train.py"})]
        assert parts[-1].done and not parts[-1].message.tool_calls
        # the server streams unless told not to; the Python client always says which
        assert fake.chat_requests[0]["stream"] is True


def test_stream_is_the_server_default():
    with FakeOllama({MODEL: 32768}, ["one two three"]) as fake:
        r = httpx.post(fake.url + "/api/chat", json={"model": MODEL, "messages": USER})
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["done"] for x in lines] == [False, False, False, True]
    assert "".join(x["message"]["content"] for x in lines) == "one two three"


def test_tool_result_messages_are_accepted_and_recorded():
    history = USER + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "read_file", "arguments": {"path": "train.py"}}}]},
        {"role": "tool", "content": "LR = 1e-3\nBATCH_SIZE = 64\n", "tool_name": "read_file"},
    ]
    with FakeOllama({MODEL: 32768}, [tool_call("read_file", path="train.py"), text("ok")]) as fake:
        c = client(fake)
        first = c.chat(MODEL, USER, tools=TOOLS)
        second = c.chat(MODEL, history, tools=TOOLS)
        assert second.message.content == "ok"
        sent = fake.chat_requests[1]["messages"]
        assert sent[2] == {"role": "tool", "content": "LR = 1e-3\nBATCH_SIZE = 64\n", "tool_name": "read_file"}
        assert sent[1]["tool_calls"][0]["function"] == {"name": "read_file", "arguments": {"path": "train.py"}}
        assert second.prompt_eval_count > first.prompt_eval_count


# What Ollama 0.12 returns for each way of writing a call: its parser looks for the tag of the model's template
# (tools/template.go parseTag): "<tool_call>" for qwen, "{" (output starting with JSON) for llama.
NATIVE = {MODEL: {"tag"}, LLAMA: {"bare", "parameters"}}


@pytest.mark.parametrize("model", [MODEL, LLAMA])
@pytest.mark.parametrize("style", ["bare", "fenced", "tag", "parameters"])
def test_tool_call_written_in_text_is_parsed_as_the_template_says(model, style):
    reply = content_tool_call("run_experiment", style=style, description="lr 3e-4")
    with FakeOllama([model], [reply, reply]) as fake:
        r = client(fake).chat(model, USER, tools=TOOLS + [RUN_TOOL])
        plain = client(fake).chat(model, USER)          # without tools the server parses nothing
    assert plain.message.content == reply.content and not plain.message.tool_calls
    if style in NATIVE[model]:
        assert [(c.function.name, c.function.arguments) for c in r.message.tool_calls] == [
            ("run_experiment", {"description": "lr 3e-4"})]
        assert r.message.content == ""
        return
    assert not r.message.tool_calls
    blob = r.message.content
    assert blob == reply.content
    wrapper = {"fenced": "```json\n", "tag": "<tool_call>\n"}.get(style)
    if wrapper:
        assert wrapper in blob and not blob.startswith("{")
        blob = blob[blob.index("{"):blob.rindex("}") + 1]
    key = "parameters" if style == "parameters" else "arguments"
    assert json.loads(blob) == {"name": "run_experiment", key: {"description": "lr 3e-4"}}


@pytest.mark.parametrize("model", [MODEL, LLAMA])
def test_native_calls_come_from_the_models_own_format(model):
    # a scripted call is written as the template writes calls, so the server's parser returns it natively
    script = [tool_calls(("edit_file", {"path": "train.py", "old_text": "a", "new_text": "b"}),
                         ("run_experiment", {"description": "d"})), tool_call("read_file", path="x")]
    with FakeOllama([model], script) as fake:
        r = client(fake).chat(model, USER, tools=TOOLS + [RUN_TOOL])
        raw = client(fake).chat(model, USER).message.content      # no tools: the model's text as it is
    assert [(c.function.name, c.function.arguments) for c in r.message.tool_calls] == [
        ("edit_file", {"path": "train.py", "old_text": "a", "new_text": "b"}), ("run_experiment", {"description": "d"})]
    assert raw == {MODEL: '<tool_call>\n{"name": "read_file", "arguments": {"path": "x"}}\n</tool_call>',
                   LLAMA: '{"name": "read_file", "parameters": {"path": "x"}}'}[model]


def test_tool_parser_like_ollama_0_12():
    names = ["read_file", "edit_file", "run_experiment"]
    call = '{"name": "edit_file", "arguments": {"path": "train.py", "old_text": "x", "new_text": "y"}}'
    args = {"path": "train.py", "old_text": "x", "new_text": "y"}
    # text before the tag is content; after it, nothing is (the closing tag and any words are dropped)
    assert parse_tool_output(f"Let me edit.\n<tool_call>\n{call}\n</tool_call> done", "<tool_call>", names) == (
        "Let me edit.\n", [("edit_file", args)])
    # the name is the first tool name in the text, even inside the arguments of another
    assert parse_tool_output('<tool_call>{"name": "run_experiment", "arguments": {"description": "after '
                             'edit_file"}}</tool_call>', "<tool_call>", names)[1] == [
        ("run_experiment", {"description": "after edit_file"})]
    # arguments as a JSON string, several calls, "parameters"
    two = ('<tool_call>{"name": "read_file", "arguments": "{\\"path\\": \\"a\\"}"}</tool_call>\n'
           '<tool_call>{"name": "read_file", "parameters": {"path": "b"}}</tool_call>')
    assert parse_tool_output(two, "<tool_call>", names) == ("", [("read_file", {"path": "a"}),
                                                                 ("read_file", {"path": "b"})])
    # an unknown tool or a call without arguments: no call, and the text after the tag is lost
    assert parse_tool_output('ok <tool_call>{"name": "rm_rf", "arguments": {}}', "<tool_call>", names) == ("ok ", [])
    assert parse_tool_output('<tool_call>{"name": "read_file"}</tool_call>', "<tool_call>", names) == ("", [])
    # "{" tag: only output that starts with JSON; without a call in it, all of it is content
    assert parse_tool_output(" " + call, "{", names) == (" ", [("edit_file", args)])
    assert parse_tool_output("Sure: " + call, "{", names) == ("Sure: " + call, [])
    assert parse_tool_output('{"lr": 3e-4} is my plan', "{", names) == ('{"lr": 3e-4} is my plan', [])
    assert parse_tool_output("no call at all", "<tool_call>", names) == ("no call at all", [])


def test_list_and_show():
    models = {MODEL: 32768, "tiny:1b": {"context_length": 2048, "capabilities": ("completion",)}}
    with FakeOllama(models) as fake:
        c = client(fake)
        names = [m.model for m in c.list().models]
        assert names == [MODEL, "tiny:1b"]
        entry = c.list().models[0]
        assert entry.size > 0 and entry.details.family == "qwen2" and entry.modified_at is not None
        info = c.show(MODEL)
        assert info.modelinfo["general.architecture"] == "qwen2"
        assert info.modelinfo["qwen2.context_length"] == 32768
        assert info.capabilities == ["completion", "tools"]
        assert info.details.parameter_size and info.template and info.modelfile
        # a bare name means :latest, and the arch prefix follows the family
        assert c.show("tiny:1b").modelinfo["llama.context_length"] == 2048
        with pytest.raises(ollama.ResponseError) as e:
            c.show("nope")
        assert e.value.status_code == 404 and e.value.error == "model 'nope' not found"


def test_unknown_model_is_404():
    with FakeOllama({MODEL: 32768}, ["never sent"]) as fake:
        c = client(fake)
        with pytest.raises(ollama.ResponseError) as e:
            c.chat("qwen3-coder:30b", USER)
        assert e.value.status_code == 404 and e.value.error == "model 'qwen3-coder:30b' not found"
        with pytest.raises(ollama.ResponseError) as e:
            list(c.chat("qwen3-coder:30b", USER, stream=True))
        assert e.value.status_code == 404
        assert fake.remaining == 1  # errors before generation consume no reply
        # tag-less names resolve to :latest, like the real server
        with FakeOllama(["llama3.2"], ["hi"]) as fake2:
            assert client(fake2).chat("llama3.2:latest", USER).message.content == "hi"


def test_server_down_raises_connection_error():
    with server_down() as url:
        c = ollama.Client(host=url)
        with pytest.raises(ConnectionError):
            c.chat(MODEL, USER)
        with pytest.raises(ConnectionError):
            c.list()
        with pytest.raises(httpx.ConnectError):  # streaming skips the client's translation
            list(c.chat(MODEL, USER, stream=True))


def test_stopped_server_is_really_down_even_for_pooled_connections():
    fake = FakeOllama({MODEL: 32768}, ["up"]).start()
    c = client(fake)
    assert c.chat(MODEL, USER).message.content == "up"  # leaves a keep-alive connection
    fake.stop()
    with pytest.raises(ConnectionError):
        c.chat(MODEL, USER)


def test_http_errors_and_mid_stream_error():
    script = [error(500, "llama runner process has terminated: exit status 2"),
              error(503, "server busy, please try again.  maximum pending requests exceeded"),
              error(500, "an error was encountered while running the model", after_chunks=2)]
    with FakeOllama({MODEL: 32768}, script) as fake:
        c = client(fake)
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(MODEL, USER)
        assert e.value.status_code == 500 and e.value.error.startswith("llama runner process")
        with pytest.raises(ollama.ResponseError) as e:
            list(c.chat(MODEL, USER, stream=True))
        assert e.value.status_code == 503
        got = []
        with pytest.raises(ollama.ResponseError) as e:
            for part in c.chat(MODEL, USER, stream=True):
                got.append(part.message.content)
        assert len(got) == 2 and e.value.error == "an error was encountered while running the model"
        assert e.value.status_code == -1  # a line in a 200 stream carries no status


def test_callable_reply_sees_the_request():
    def edit_from_prompt(req):
        src = req["messages"][-1]["content"]
        old = next(line for line in src.splitlines() if line.startswith("LR ="))
        return tool_call("edit_file", path="train.py", old_text=old, new_text="LR = 3e-4")

    with FakeOllama({MODEL: 32768}, [edit_from_prompt, lambda req: f"{len(req['messages'])} messages"]) as fake:
        c = client(fake)
        r = c.chat(MODEL, [{"role": "user", "content": "train.py:\nimport torch\nLR = 1e-3\n"}], tools=TOOLS)
        assert r.message.tool_calls[0].function.arguments["old_text"] == "LR = 1e-3"
        assert c.chat(MODEL, USER * 3).message.content == "3 messages"


def test_failing_reply_function_is_a_500_and_fails_the_test():
    fake = FakeOllama({MODEL: 32768}, [lambda req: req["no such key"], "never sent"])
    with pytest.raises(AssertionError, match="KeyError"):
        with fake:
            with pytest.raises(ollama.ResponseError) as e:
                client(fake).chat(MODEL, USER)
            assert e.value.status_code == 500 and "KeyError" in e.value.error
            with pytest.raises(ollama.ResponseError) as e:     # the rest of the script no longer applies
                client(fake).chat(MODEL, USER)
            assert e.value.status_code == 400 and fake.remaining == 1


def test_exhausted_script_never_hangs():
    with FakeOllama({MODEL: 32768}, ["only one"]) as fake:
        c = client(fake, timeout=5)
        assert c.chat(MODEL, USER).message.content == "only one"
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(MODEL, USER)
        assert e.value.status_code == 500 and "script exhausted" in e.value.error
    with FakeOllama({MODEL: 32768}, [], on_exhausted=text("I have nothing more to add.")) as fake:
        assert client(fake).chat(MODEL, USER).message.content == "I have nothing more to add."


def test_delay_gives_a_read_timeout_and_stop_cuts_it_short():
    with FakeOllama({MODEL: 32768}, [delay(0.3, text("slow")), delay(60)]) as fake:
        t0 = time.monotonic()
        assert client(fake).chat(MODEL, USER).message.content == "slow"
        assert time.monotonic() - t0 >= 0.3
        with pytest.raises(httpx.ReadTimeout):
            client(fake, timeout=0.3).chat(MODEL, USER)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3  # the 60 s delay did not hold up stop()


def test_context_accounting():
    with FakeOllama({MODEL: 32768, "small:1b": 2048}, ["a", "b", "c", "d", "e"], default_num_ctx=4096) as fake:
        c = client(fake)
        big = [{"role": "user", "content": "word " * 10000}]  # about 12.5K tokens
        r = c.chat(MODEL, big, options={"num_ctx": 16384})
        assert r.prompt_eval_count == 50000 // 4 + 4
        assert fake.requests_to("/api/chat")[-1]["truncated"] is False
        # no num_ctx: the server default applies and the prompt is cut silently
        r = c.chat(MODEL, big)
        assert r.prompt_eval_count == 4096 and fake.requests_to("/api/chat")[-1]["truncated"] is True
        # a num_ctx above what the model was trained for is clamped
        r = c.chat("small:1b", big, options={"num_ctx": 65536})
        assert r.prompt_eval_count == 2048 and fake.requests_to("/api/chat")[-1]["num_ctx"] == 2048
        # changing num_ctx reloads the runner; keeping it does not
        c.chat(MODEL, USER, options={"num_ctx": 16384})
        c.chat(MODEL, USER, options={"num_ctx": 16384})
        assert fake.loads == [(MODEL, 16384), (MODEL, 4096), ("small:1b", 2048), (MODEL, 16384)]
        assert [m.context_length for m in c.ps().models] == [16384, 2048]


def test_reply_overrides_and_num_predict():
    with FakeOllama({MODEL: 32768}, [text("x", prompt_eval_count=15000, eval_count=7),
                                     text("word " * 400)]) as fake:
        c = client(fake)
        r = c.chat(MODEL, USER, options={"num_ctx": 16384})
        assert (r.prompt_eval_count, r.eval_count) == (15000, 7)
        r = c.chat(MODEL, USER, options={"num_ctx": 16384, "num_predict": 50})
        assert r.done_reason == "length" and r.eval_count == 50 and len(r.message.content) == 200


def test_capability_and_option_errors_like_the_server():
    models = [Model("codellama:7b", 16384, capabilities=("completion",)), Model(MODEL)]
    with FakeOllama(models, ["unused"]) as fake:
        c = client(fake)
        with pytest.raises(ollama.ResponseError) as e:
            c.chat("codellama:7b", USER, tools=TOOLS)
        assert e.value.status_code == 400
        assert e.value.error == "registry.ollama.ai/library/codellama:7b does not support tools"
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(MODEL, USER, think=True)
        assert (e.value.status_code, e.value.error) == (400, '"qwen2.5-coder:7b" does not support thinking')
        with pytest.raises(ollama.ResponseError) as e:
            c.chat(MODEL, USER, options={"num_ctx": "16k"})
        assert (e.value.status_code, e.value.error) == (500, 'option "num_ctx" must be of type integer')
        assert fake.remaining == 1


@pytest.mark.parametrize("patch, error", [
    ({"messages": [{"role": "user", "content": 3}]},
     "json: cannot unmarshal number into Go struct field Message.messages.content of type string"),
    ({"messages": {"role": "user", "content": "x"}},
     "json: cannot unmarshal object into Go struct field ChatRequest.messages of type []api.Message"),
    ({"messages": USER + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "read_file", "arguments": '{"path": "x"}'}}]}]},
     "json: cannot unmarshal string into Go struct field ToolCallFunction.messages.tool_calls.function.arguments "
     "of type api.ToolCallFunctionArguments"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "path"}}}]},
     "json: cannot unmarshal string into Go struct field ToolFunctionParameters.tools.function.parameters.required "
     "of type []string"),
    ({"keep_alive": "30 minutes"}, 'time: invalid duration "30 minutes"'),
    ({"stream": "no"}, "json: cannot unmarshal string into Go struct field ChatRequest.stream of type bool"),
    ({"options": [1]}, "json: cannot unmarshal array into Go struct field ChatRequest.options of type "
                       "map[string]interface {}"),
])
def test_request_shapes_the_server_refuses(patch, error):
    with FakeOllama({MODEL: 32768}, ["unused"]) as fake:
        r = httpx.post(fake.url + "/api/chat", json={"model": MODEL, "messages": USER, "stream": False, **patch})
        assert (r.status_code, r.json()) == (400, {"error": error})
        assert fake.remaining == 1
        # the shapes the harness sends are accepted, unknown fields ignored
        ok = {"model": MODEL, "stream": False, "keep_alive": "30m", "options": {"num_ctx": 16384}, "tools": TOOLS,
              "messages": USER + [{"role": "assistant", "content": "", "tool_calls": [
                  {"function": {"name": "read_file", "arguments": {"path": "x"}}}]},
                  {"role": "tool", "content": "x", "tool_name": "read_file"}], "surprise": 1}
        assert httpx.post(fake.url + "/api/chat", json=ok).status_code == 200


def test_thinking_models():
    models = [Model("qwen3:8b", 40960, capabilities=("completion", "tools", "thinking"))]
    with FakeOllama(models, [text("LR = 3e-4", thinking="The loss plateaus."), text("x", thinking="hidden")]) as fake:
        c = client(fake)
        r = c.chat("qwen3:8b", USER, think=True)
        assert (r.message.thinking, r.message.content) == ("The loss plateaus.", "LR = 3e-4")
        assert not c.chat("qwen3:8b", USER, think=False).message.thinking
        assert c.show("qwen3:8b").modelinfo["qwen3.context_length"] == 40960


def test_load_requests_consume_no_reply():
    with FakeOllama({MODEL: 32768}, ["real answer"]) as fake:
        c = client(fake)
        r = c.chat(MODEL, [], options={"num_ctx": 16384})
        assert r.done_reason == "load" and r.message.content == ""
        assert c.chat(MODEL, [], keep_alive=0).done_reason == "unload"
        assert fake.remaining == 1
        assert c.generate(MODEL, "hello").response == "real answer"


def test_plain_endpoints():
    with FakeOllama() as fake:
        assert httpx.get(fake.url).text == "Ollama is running"
        assert httpx.head(fake.url).status_code == 200
        assert httpx.get(fake.url + "/api/version").json()["version"]
        r = httpx.get(fake.url + "/api/nothing")
        assert (r.status_code, r.text) == (404, "404 page not found")
        assert httpx.get(fake.url + "/api/chat").status_code == 405
        r = httpx.post(fake.url + "/api/chat", content=b"")
        assert (r.status_code, r.json()) == (400, {"error": "missing request body"})
        r = httpx.post(fake.url + "/api/chat", content=b"nope")
        assert r.status_code == 400 and r.json()["error"].startswith("invalid character 'n'")
        assert [r["path"] for r in fake.requests][:3] == ["/", "/", "/api/version"]
        assert fake.requests[-1]["status"] == 400

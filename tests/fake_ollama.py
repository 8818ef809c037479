"""A scripted Ollama server for tests: the real wire format on loopback, no model behind it.

The harness under test talks to it through the real `ollama` client, exactly as it would talk to
`ollama serve`; only the replies are scripted. Wire format follows the Ollama server
(server/routes.go, api/types.go) and docs/api.md.

    from fake_ollama import FakeOllama, text, tool_call, content_tool_call, error, delay

    script = [
        tool_call("read_file", path="train.py"),                 # a tool call, as the model's template writes it
        content_tool_call("run_experiment", description="lr"),   # JSON in the text, qwen2.5-coder style
        lambda req: text(f"{len(req['messages'])} messages"),    # computed from the request
        error(500, "llama runner process has terminated"),       # HTTP error, body {"error": ...}
        delay(2.0, text("slow")),                                # reply after 2 s (timeouts)
    ]
    with FakeOllama({"qwen2.5-coder:7b": 32768}, script) as fake:
        client = ollama.Client(host=fake.url)
        ...
        assert fake.chat_requests[0]["options"]["num_ctx"] == 16384
        assert fake.remaining == 0

A reply is what the model generates: text, with tool calls written in its template's format. As in
Ollama 0.12, a chat request with tools gets the calls the server's parser finds in that text as native
`tool_calls` (parse_tool_output: the <tool_call> tag of qwen models, JSON at the start for llama ones),
and the rest as content; a request without tools gets the text as it is.

Each /api/chat (and /api/generate) request with messages consumes one reply; when the script is
empty the server answers with `on_exhausted` (default: HTTP 500), it never hangs. A reply function
that raises is answered with HTTP 500, every later request with a 400, and the exception is re-raised as
AssertionError when the `with` block ends.
"""
import copy
import hashlib
import json
import re
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OLLAMA_VERSION = "0.12.6"
DEFAULT_MODEL = "qwen2.5-coder:7b"


# ----------------------------------------------------------------------------- replies

@dataclass
class Reply:
    """One scripted model turn. Build it with the helpers below or directly."""
    content: str = ""
    tool_calls: list = field(default_factory=list)  # [(name, arguments dict), ...]
    thinking: str = ""
    delay: float = 0.0              # seconds before anything is sent
    status: int = 0                 # non-zero: an HTTP error with body {"error": error}
    error: str = ""
    error_after: int = -1           # >= 0: stream this many content chunks, then an {"error"} line
    done_reason: str = "stop"
    prompt_eval_count: int = None   # override the estimate (e.g. to fake a nearly full context)
    eval_count: int = None


def text(content, **kw):
    """A plain assistant message."""
    return Reply(content=content, **kw)


def tool_call(_name, _arguments=None, /, **arguments):
    """A tool call in the model's own format: native message.tool_calls = [{function: {name, arguments}}] when the
    request carries tools."""
    return Reply(tool_calls=[(_name, {**(_arguments or {}), **arguments})])


def tool_calls(*calls, content=""):
    """Several native tool calls, given as (name, arguments) pairs, with optional content."""
    return Reply(content=content, tool_calls=[(n, dict(a)) for n, a in calls])


def content_tool_call(_name, _arguments=None, /, style="bare", **arguments):
    """A tool call written as JSON text in a style the model's template may not use (what qwen2.5-coder often
    does): it stays in `content` unless the server's parser recognizes it (parse_tool_output).

    style: "bare" {"name":..,"arguments":..}; "fenced" the same inside ```json fences after a
    sentence; "tag" inside <tool_call></tool_call>; "parameters" uses the key "parameters"."""
    args = {**(_arguments or {}), **arguments}
    key = "parameters" if style == "parameters" else "arguments"
    blob = json.dumps({"name": _name, key: args})
    content = {
        "bare": blob, "parameters": blob,
        "fenced": f"I'll call {_name}.\n```json\n{blob}\n```",
        "tag": f"<tool_call>\n{blob}\n</tool_call>",
    }[style]
    return Reply(content=content)


def error(status, message, after_chunks=-1):
    """An HTTP error like the real server's: status code, body {"error": message}.
    With after_chunks >= 0 a streaming request gets that many content chunks (HTTP 200) and then
    the error as an NDJSON line, as when the runner dies mid-generation."""
    return Reply(status=status, error=message, error_after=after_chunks,
                 content="partial output " * max(after_chunks, 0))


def delay(seconds, reply=None):
    """`reply` (default: a short text) sent after `seconds`; stop() cuts the wait short."""
    r = as_reply(reply if reply is not None else "(delayed reply)")
    return replace(r, delay=seconds)


def as_reply(item):
    if isinstance(item, Reply):
        return item
    if isinstance(item, str):
        return text(item)
    raise TypeError(f"fake_ollama: a reply must be a Reply, a str or a callable, not {item!r}")


# ----------------------------------------------------------------------------- models

@dataclass
class Model:
    """A model as the server knows it. Its chat template decides what Ollama does with tool calls:
    tool_tag "<tool_call>" (qwen2.5, qwen2.5-coder: the template wraps calls in <tool_call> tags) or "{" (llama3.1:
    the template writes bare JSON, so the server takes output that starts with "{" for a call); "tools" in
    capabilities means the template renders .Tools (without it, a chat request with tools is refused)."""
    name: str
    context_length: int = 32768
    capabilities: tuple = ("completion", "tools")
    family: str = ""
    tool_tag: str = ""
    parameter_size: str = "7.6B"
    quantization_level: str = "Q4_K_M"
    size: int = 4683087332

    def __post_init__(self):
        self.name = canonical(self.name)
        if not self.family:
            base = self.name.rsplit("/", 1)[-1].split(":")[0].lower()
            self.family = ("qwen2" if base.startswith("qwen2") else "qwen3" if base.startswith("qwen3")
                           else "llama")
        self.tool_tag = self.tool_tag or ("<tool_call>" if self.family.startswith("qwen") else "{")
        self.digest = hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def template(self):
        tools = "tools" in self.capabilities
        if self.tool_tag == "<tool_call>":
            calls = ('{{- if .ToolCalls }}<tool_call>\n{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", '
                     '"arguments": {{ .Function.Arguments }}}\n{{ end }}</tool_call>{{- end }}')
        else:
            calls = ('{{- if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": '
                     '{{ .Function.Arguments }}}{{ end }}{{- end }}')
        return ("{{- if .Messages }}{{- if or .System" + (" .Tools" if tools else "") + " }}<|im_start|>system\n"
                "{{ .System }}" + ("{{- if .Tools }}\n\n# Tools\n\n<tools>{{- range .Tools }}\n{{ .Function }}"
                                   "{{- end }}\n</tools>{{- end }}" if tools else "") +
                "<|im_end|>\n{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}" +
                (calls if tools else "") + "<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ end }}")

    def raw_output(self, reply):
        """What the model itself generates for a scripted reply: its content, then each tool call written the way
        its template shows them to it."""
        if self.tool_tag == "<tool_call>":
            calls = [f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>' for n, a in reply.tool_calls]
        else:
            calls = [json.dumps({"name": n, "parameters": a}) for n, a in reply.tool_calls]
        return "\n".join(([reply.content] if reply.content else []) + calls)


def parse_tool_output(text, tag, names):
    """Ollama 0.12's tool-call parser (tools/tools.go) on a model's whole output: (content, [(name, arguments)]).

    Text before the tag is content. After it, each call is the first tool name in the buffer with the first JSON
    object that holds its arguments ({"name", "arguments" | "parameters"}, {<tool name>: {...}}, else the object
    itself). What follows a "<tool_call>"-style tag is never content; for the "{" tag the output must start with
    "{", and if no call is found in it the whole output is content after all."""
    i = text.find(tag)
    if i == -1 or (tag == "{" and text[:i].strip()):
        return text, []
    content, buf, calls = text[:i], text[i:], []
    while True:
        found = _next_call(buf, names)
        if found is None:
            break
        call, end = found
        calls.append(call)
        buf = buf[end:]
    if not calls and tag == "{":
        return text, []
    return content, calls


def _next_call(buf, names):
    hits = sorted((buf.find(n), -len(n), n) for n in names if n in buf)
    if not hits:
        return None
    start, _, name = hits[0]
    depth, begin, in_str, escaped = 0, -1, False, False
    for j, c in enumerate(buf):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif c == "{":
            begin = j if depth == 0 else begin
            depth += 1
        elif c == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                try:
                    obj = json.loads(buf[begin:j + 1])
                except ValueError:
                    continue
                args = _arguments(obj, name) if isinstance(obj, dict) else None
                if args is _NO_ARGS:
                    return None
                return (name, obj if args is None else args), max(start + len(name), j + 1)
    return None


_NO_ARGS = object()


def _arguments(obj, name):
    def as_map(v):
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                return None
        return v if isinstance(v, dict) else None
    if "name" in obj:
        found = as_map(obj.get("arguments")) or as_map(obj.get("parameters"))
        return _NO_ARGS if found is None else found
    if as_map(obj.get(name)) is not None:
        return as_map(obj[name])
    for v in obj.values():
        for child in (v if isinstance(v, list) else [v]):
            if isinstance(child, dict):
                found = _arguments(child, name)
                if found is not None:
                    return found
    return None


def canonical(name):
    """Ollama names without a tag mean :latest."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def full_name(name):
    """How the server spells a name inside error messages (model.Name.String())."""
    name = canonical(name)
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library"] + parts
    elif len(parts) == 2:
        parts = ["registry.ollama.ai"] + parts
    return "/".join(parts)


def _make_models(models):
    if models is None:
        models = {DEFAULT_MODEL: 32768}
    if isinstance(models, dict):
        out = []
        for name, spec in models.items():
            out.append(Model(name, **spec) if isinstance(spec, dict) else Model(name, int(spec)))
        return out
    return [m if isinstance(m, Model) else Model(m) for m in models]


# ----------------------------------------------------------------------------- tokens

def estimate_tokens(request):
    """A plausible prompt token count: characters of messages and tools / 4, plus template
    overhead per message. Deterministic, so tests can compute the same number."""
    messages = request.get("messages") or []
    chars = 0
    for m in messages:
        chars += len(m.get("content") or "") + len(m.get("thinking") or "")
        for tc in m.get("tool_calls") or []:
            chars += len(json.dumps(tc.get("function", {})))
    if request.get("prompt"):
        chars += len(request["prompt"]) + len(request.get("system") or "")
        messages = [None]
    if request.get("tools"):
        chars += len(json.dumps(request["tools"]))
    return chars // 4 + 4 * len(messages)


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------- server

class _HTTPError(Exception):
    def __init__(self, status, message, plain=False):
        super().__init__(message)
        self.status, self.message, self.plain = status, message, plain


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # clients that time out and hang up are normal in tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming, like Go's net/http

    def setup(self):
        super().setup()
        # Go's net/http sets TCP_NODELAY; without it Nagle + delayed ACK add ~40 ms a request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._connections.add(self.connection)

    def finish(self):
        self.server.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, *args):
        pass

    def version_string(self):
        return "fake-ollama"

    def do_GET(self):
        self.server.fake._dispatch(self, "GET")

    def do_HEAD(self):
        self.server.fake._dispatch(self, "HEAD")

    def do_POST(self):
        self.server.fake._dispatch(self, "POST")

    def do_DELETE(self):
        self.server.fake._dispatch(self, "DELETE")

    def do_PUT(self):
        self.server.fake._dispatch(self, "PUT")


_ROUTES = {
    "/": {"GET", "HEAD"},
    "/api/version": {"GET", "HEAD"},
    "/api/tags": {"GET", "HEAD"},
    "/api/ps": {"GET"},
    "/api/show": {"POST"},
    "/api/chat": {"POST"},
    "/api/generate": {"POST"},
}

_INT_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed",
                "num_predict", "top_k", "repeat_last_n", "mirostat"}
_FLOAT_OPTIONS = {"top_p", "min_p", "tfs_z", "typical_p", "temperature", "repeat_penalty",
                  "presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta"}


# api.ChatRequest of 0.12 (api/types.go) as the server binds it with Go's encoding/json: a value of the wrong JSON
# type is a 400 naming the field, unknown fields are ignored, null is always fine.
_STRUCTS = {
    "ChatRequest": {"model": "string", "messages": ["Message"], "tools": ["Tool"], "stream": "bool", "format": "any",
                    "keep_alive": "duration", "think": "think", "options": "map[string]interface {}",
                    "truncate": "bool", "shift": "bool"},
    "Message": {"role": "string", "content": "string", "thinking": "string", "images": ["api.ImageData"],
                "tool_calls": ["ToolCall"], "tool_name": "string"},
    "ToolCall": {"function": "ToolCallFunction"},
    "ToolCallFunction": {"index": "int", "name": "string", "arguments": "api.ToolCallFunctionArguments"},
    "Tool": {"type": "string", "items": "any", "function": "ToolFunction"},
    "ToolFunction": {"name": "string", "description": "string", "parameters": "ToolFunctionParameters"},
    "ToolFunctionParameters": {"type": "string", "$defs": "any", "items": "any", "required": ["string"],
                               "properties": {"*": "ToolProperty"}},
    "ToolProperty": {"type": "api.PropertyType", "items": "any", "description": "string", "enum": ["any"]},
}
_GO = {"string": str, "bool": bool, "int": int, "api.ImageData": str}
_MAPS = {"map[string]interface {}", "api.ToolCallFunctionArguments"}


def _json_kind(v):
    return ("string" if isinstance(v, str) else "bool" if isinstance(v, bool) else "number"
            if isinstance(v, (int, float)) else "array" if isinstance(v, list) else "object")


def go_shape_error(value, spec, struct="ChatRequest", path=""):
    """The error Go's json.Unmarshal gives for `value` bound to `spec` (see _STRUCTS), or None."""
    def wrong(go_type):
        return f"json: cannot unmarshal {_json_kind(value)} into Go struct field {struct}.{path} of type {go_type}"
    if value is None or spec == "any":
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return wrong("[]" + (spec[0] if "." in spec[0] or spec[0] in _GO or spec[0] == "any" else
                                 "api." + spec[0]))
        return next((e for e in (go_shape_error(v, spec[0], struct, path) for v in value) if e), None)
    if isinstance(spec, dict):   # map[string]<spec["*"]>
        if not isinstance(value, dict):
            return wrong("map[string]api." + spec["*"])
        return next((e for e in (go_shape_error(v, spec["*"], struct, path) for v in value.values()) if e), None)
    if spec in _STRUCTS:
        if not isinstance(value, dict):
            return wrong("api." + spec)
        for k, v in value.items():
            if k in _STRUCTS[spec]:
                e = go_shape_error(v, _STRUCTS[spec][k], spec, f"{path}.{k}" if path else k)
                if e:
                    return e
        return None
    if spec in _MAPS:
        return None if isinstance(value, dict) else wrong(spec)
    if spec == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return wrong("int")
        return None if float(value).is_integer() else (f"json: cannot unmarshal number {value} into Go struct "
                                                       f"field {struct}.{path} of type int")
    if spec == "duration":   # api.Duration: seconds as a number, or a Go duration string
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return f"Unsupported type: '{type(value).__name__}'"
        return None if not isinstance(value, str) or GO_DURATION.fullmatch(value) else f"time: invalid duration {json.dumps(value)}"
    if spec == "think":      # api.ThinkValue: a bool, or a level for the models that take one
        return None if isinstance(value, bool) or value in ("high", "medium", "low") else (
            f"invalid think value: {json.dumps(value)} (must be \"high\", \"medium\", \"low\", true, or false)")
    if spec == "api.PropertyType":   # a type name or a list of them
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(x, str) for x in value))
        return None if ok else f"json: cannot unmarshal {_json_kind(value)} into Go value of type []string"
    return None if isinstance(value, _GO[spec]) and not (spec != "bool" and isinstance(value, bool)) else wrong(spec)


GO_DURATION = re.compile(r"[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+)")


class FakeOllama:
    """An Ollama API server on 127.0.0.1:<free port>, run in a daemon thread.

    models: {name: context_length} or {name: {context_length, capabilities, family, ...}} or a
            list of names / Model. Default: {"qwen2.5-coder:7b": 32768}.
    script: replies consumed in order by chat/generate requests; each a Reply, a str (text) or
            a callable fn(request_json) -> Reply | str.
    on_exhausted: the reply once the script is used up (default: HTTP 500 naming the request).
    default_num_ctx: context used when a request sends no options.num_ctx (real: 2048/4096/VRAM).
    """

    def __init__(self, models=None, script=(), *, on_exhausted=None, default_num_ctx=4096,
                 version=OLLAMA_VERSION, strict=True, port=0):
        self.models = _make_models(models)
        self.on_exhausted = on_exhausted
        self.default_num_ctx = default_num_ctx
        self.version = version
        self.strict = strict
        self._port = port
        self.requests = []   # every request: {"method", "path", "json", "headers", ...}
        self.errors = []     # exceptions raised by reply functions (strict: raised at exit)
        self.loads = []      # (model, num_ctx) each time the "runner" (re)loads
        self._script = [] if script is None else list(script)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections = set()
        self._loaded = {}    # model -> (num_ctx, expires)
        self._server = None
        self._thread = None

    # -- lifecycle

    def start(self):
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self._port), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-ollama", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop listening and cut open keep-alive connections, so the URL is really down."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        if self.strict and self.errors and exc_type is None:
            raise AssertionError("fake_ollama: reply function(s) raised:\n" + "\n".join(self.errors))

    @property
    def port(self):
        return self._server.server_address[1]

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    host = url

    # -- scripting and inspection

    def add(self, *replies):
        with self._lock:
            self._script.extend(replies)

    @property
    def remaining(self):
        with self._lock:
            return len(self._script)

    @property
    def chat_requests(self):
        """The parsed JSON bodies of all /api/chat requests, in order."""
        with self._lock:
            return [r["json"] for r in self.requests if r["path"] == "/api/chat"]

    def requests_to(self, path):
        with self._lock:
            return [r for r in self.requests if r["path"] == path]

    # -- HTTP

    def _dispatch(self, h, method):
        path = h.path.split("?", 1)[0]
        record = {"method": method, "path": path, "json": None, "headers": dict(h.headers),
                  "time": time.time()}
        h.fake_record = record
        with self._lock:
            self.requests.append(record)
        try:
            body = self._read_body(h)
            if path not in _ROUTES:
                raise _HTTPError(404, "404 page not found", plain=True)
            if method not in _ROUTES[path]:
                raise _HTTPError(405, "405 method not allowed", plain=True)
            if method == "POST":
                record["json"] = self._parse_json(body, path)
            getattr(self, "_route_" + (path.strip("/").replace("api/", "") or "root"))(h, method, record)
        except _HTTPError as e:
            if e.plain:
                self._send(h, e.status, e.message.encode(), "text/plain", method)
            else:
                self._send_json(h, e.status, {"error": e.message}, method)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _read_body(self, h):
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _parse_json(self, body, path):
        if not body.strip():
            raise _HTTPError(400, "missing request body")
        try:
            data = json.loads(body)
        except ValueError:
            first = body.strip()[:1].decode(errors="replace")
            raise _HTTPError(400, f"invalid character '{first}' looking for beginning of value"
                             if first not in "{[" else "unexpected EOF")
        if not isinstance(data, dict):
            kind = {list: "array", str: "string", bool: "bool"}.get(type(data), "number")
            go_type = {"/api/chat": "api.ChatRequest", "/api/show": "api.ShowRequest"}.get(path, "api.GenerateRequest")
            raise _HTTPError(400, f"json: cannot unmarshal {kind} into Go value of type {go_type}")
        return data

    def _send(self, h, status, payload, ctype, method="GET"):
        h.fake_record["status"] = status
        h.send_response(status)
        h.send_header("Content-Type", ctype + "; charset=utf-8")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(payload)
        h.wfile.flush()

    def _send_json(self, h, status, obj, method="GET"):
        self._send(h, status, json.dumps(obj).encode(), "application/json", method)

    def _find(self, name):
        if not isinstance(name, str) or not name:
            return None
        want = canonical(name).lower()
        for m in self.models:
            if m.name.lower() == want:
                return m
        return None

    # -- simple routes

    def _route_root(self, h, method, record):
        self._send(h, 200, b"Ollama is running", "text/plain", method)

    def _route_version(self, h, method, record):
        self._send_json(h, 200, {"version": self.version}, method)

    def _details(self, m):
        return {"parent_model": "", "format": "gguf", "family": m.family, "families": [m.family],
                "parameter_size": m.parameter_size, "quantization_level": m.quantization_level}

    def _route_tags(self, h, method, record):
        models = [{"name": m.name, "model": m.name, "modified_at": "2025-05-14T10:11:12.123456789+02:00",
                   "size": m.size, "digest": m.digest, "details": self._details(m)} for m in self.models]
        self._send_json(h, 200, {"models": models}, method)

    def _route_ps(self, h, method, record):
        out = []
        with self._lock:
            loaded = dict(self._loaded)
        for m in self.models:
            if m.name in loaded:
                num_ctx, expires = loaded[m.name]
                out.append({"name": m.name, "model": m.name, "size": m.size + num_ctx * 57344,
                            "digest": m.digest, "details": self._details(m),
                            "expires_at": datetime.fromtimestamp(expires, timezone.utc).isoformat(),
                            "size_vram": m.size + num_ctx * 57344, "context_length": num_ctx})
        self._send_json(h, 200, {"models": out}, method)

    def _route_show(self, h, method, record):
        req = record["json"]
        name = req.get("model") or req.get("name")
        if not name:
            raise _HTTPError(400, "model is required")
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, f"model '{name}' not found")
        arch, template = m.family, m.template
        self._send_json(h, 200, {
            "license": "Apache License\nVersion 2.0, January 2004",
            "modelfile": (f'# Modelfile generated by "ollama show"\n# To build a new Modelfile based on this, '
                          f"replace FROM with:\n# FROM {m.name}\n\nFROM /root/.ollama/models/blobs/"
                          f"sha256-{m.digest}\nTEMPLATE \"\"\"{template}\"\"\"\n"),
            "template": template,
            "details": self._details(m),
            "model_info": {
                "general.architecture": arch,
                "general.basename": m.name.split(":")[0],
                "general.file_type": 15,
                "general.parameter_count": 7615616512,
                "general.quantization_version": 2,
                "general.type": "model",
                f"{arch}.attention.head_count": 28,
                f"{arch}.attention.head_count_kv": 4,
                f"{arch}.block_count": 28,
                f"{arch}.context_length": m.context_length,
                f"{arch}.embedding_length": 3584,
                f"{arch}.feed_forward_length": 18944,
                f"{arch}.rope.freq_base": 1000000,
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": [],
            },
            "capabilities": list(m.capabilities),
            "modified_at": "2025-05-14T10:11:12.123456789+02:00",
        })

    # -- inference

    def _check_inference(self, req, messages_key):
        if messages_key == "messages":
            e = go_shape_error(req, "ChatRequest")
            if e:
                raise _HTTPError(400, e)
        name = req.get("model")
        if not name or not isinstance(name, str):
            raise _HTTPError(400, "model is required")
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, f"model '{name}' not found")
        if messages_key == "messages" and req.get("tools") and "tools" not in m.capabilities:
            raise _HTTPError(400, f"{full_name(m.name)} does not support tools")
        think = req.get("think")
        if think not in (None, False) and "thinking" not in m.capabilities:
            raise _HTTPError(400, f"{json.dumps(name)} does not support thinking")
        opts = req.get("options") or {}
        if not isinstance(opts, dict):
            raise _HTTPError(400, "json: cannot unmarshal into Go struct field options of type map[string]interface {}")
        for k, v in opts.items():
            if k in _INT_OPTIONS and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise _HTTPError(500, f'option "{k}" must be of type integer')
            if k in _FLOAT_OPTIONS and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise _HTTPError(500, f'option "{k}" must be of type float32')
        # a num_ctx above the trained context is clamped by the server, with only a log line
        num_ctx = min(int(opts.get("num_ctx") or self.default_num_ctx), m.context_length)
        return m, num_ctx

    def _load(self, m, num_ctx, keep_alive):
        """Returns load_duration in ns; a new num_ctx reloads the runner like the real server."""
        with self._lock:
            prev = self._loaded.get(m.name)
            reload = prev is None or prev[0] != num_ctx
            self._loaded[m.name] = (num_ctx, time.time() + 300)
            if keep_alive in (0, "0", "0s", "0m"):
                del self._loaded[m.name]
            if reload:
                self.loads.append((m.name, num_ctx))
        return 1_850_000_000 if reload else 21_000_000

    def _next_reply(self, req):
        if self.errors:   # the script no longer fits the conversation: stop the client at once (400: no retry)
            return error(400, "fake_ollama: a reply function raised earlier; see the test's failure")
        with self._lock:
            n = sum(1 for r in self.requests if r["path"] in ("/api/chat", "/api/generate"))
            item = self._script.pop(0) if self._script else None
        if item is None:
            item = self.on_exhausted
            if item is None:
                return error(500, f"fake_ollama: script exhausted at request #{n}")
        if callable(item) and not isinstance(item, Reply):
            try:
                item = item(copy.deepcopy(req))
            except Exception as e:  # surfaced at __exit__, the harness only sees a 500
                self.errors.append(traceback.format_exc())
                return error(500, f"fake_ollama: reply function raised {e!r}")
            if item is None:
                item = ""
        return as_reply(item)

    def _route_chat(self, h, method, record):
        self._inference(h, record, chat=True)

    def _route_generate(self, h, method, record):
        self._inference(h, record, chat=False)

    def _inference(self, h, record, chat):
        t0 = time.monotonic()
        req = record["json"]
        m, num_ctx = self._check_inference(req, "messages" if chat else "prompt")
        stream = req.get("stream", True) is not False  # the server streams unless told not to
        load_ns = self._load(m, num_ctx, req.get("keep_alive"))
        base = {"model": req["model"], "created_at": _now()}
        empty = not req.get("messages") if chat else not req.get("prompt")
        if empty:  # load / unload requests consume no reply
            reason = "unload" if req.get("keep_alive") in (0, "0", "0s", "0m") else "load"
            body = {**base, **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}),
                    "done_reason": reason, "done": True}
            return self._send_json(h, 200, body)

        reply = self._next_reply(req)
        record["reply"] = reply
        if reply.delay and self._stopping.wait(reply.delay):
            h.close_connection = True
            return

        prompt_tokens = estimate_tokens(req)
        record["prompt_tokens"] = prompt_tokens
        record["num_ctx"] = num_ctx
        # the real server truncates an over-long prompt silently; only the count shows it
        record["truncated"] = prompt_tokens > num_ctx
        prompt_eval = reply.prompt_eval_count if reply.prompt_eval_count is not None else min(prompt_tokens, num_ctx)

        # The model only writes text (cut at num_predict); with tools in the request the server parses calls out of it.
        content, calls, done_reason = m.raw_output(reply), [], reply.done_reason
        eval_count = reply.eval_count if reply.eval_count is not None else max(1, len(content + reply.thinking) // 4)
        num_predict = (req.get("options") or {}).get("num_predict") or 0
        if num_predict > 0 and eval_count > num_predict:
            content, done_reason, eval_count = content[:num_predict * 4], "length", num_predict
        if chat and req.get("tools"):
            content, calls = parse_tool_output(content, m.tool_tag, [t["function"]["name"] for t in req["tools"]])

        if reply.status and not (stream and reply.error_after >= 0):
            return self._send_json(h, reply.status, {"error": reply.error})

        thinking = reply.thinking if req.get("think") is not False else ""
        # api.ToolCall of 0.12: no id, and index is omitempty (so the first call has none)
        wire_calls = [{"function": {**({"index": i} if i else {}), "name": n, "arguments": a}}
                      for i, (n, a) in enumerate(calls)]

        def message(c, th="", tc=None):
            if not chat:
                d = {"response": c}
                if th:
                    d["thinking"] = th
                return d
            msg = {"role": "assistant", "content": c}
            if th:
                msg["thinking"] = th
            if tc:
                msg["tool_calls"] = tc
            return {"message": msg}

        prompt_ns = prompt_eval * 180_000
        eval_ns = eval_count * 22_000_000
        final = {**base, **message(""), "done_reason": done_reason, "done": True,
                 "total_duration": load_ns + prompt_ns + eval_ns + int((time.monotonic() - t0) * 1e9),
                 "load_duration": load_ns, "prompt_eval_count": prompt_eval,
                 "prompt_eval_duration": prompt_ns, "eval_count": eval_count, "eval_duration": eval_ns}
        if not chat:
            final["context"] = list(range(1, 9))

        if not stream:
            final.update(message(content, thinking, wire_calls))
            return self._send_json(h, 200, final)

        h.fake_record["status"] = 200
        h.send_response(200)
        h.send_header("Content-Type", "application/x-ndjson")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def line(obj):
            data = json.dumps(obj).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        def chunk(**kw):
            line({**base, "created_at": _now(), **message(**kw), "done": False})

        for piece in re.findall(r"\S+\s*|\s+", thinking):
            chunk(c="", th=piece)
        pieces = re.findall(r"\S+\s*|\s+", content)
        if reply.status:  # error mid-stream: status 200 is already on the wire
            for piece in pieces[:reply.error_after]:
                chunk(c=piece)
            line({"error": reply.error})
        else:
            for piece in pieces:
                chunk(c=piece)
            if wire_calls:  # the tool parser emits calls as one chunk with empty content
                chunk(c="", tc=wire_calls)
            line(final)
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()


# ----------------------------------------------------------------------------- server down

class server_down:
    """A loopback URL where nothing listens: the port stays bound (so nobody else takes it) but
    never listens, so connecting is refused at once.

        with server_down() as url:
            ollama.Client(host=url).list()   # -> ConnectionError
    """

    def __enter__(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        return self.url

    def __exit__(self, *exc):
        self._sock.close()


# ----------------------------------------------------------------------------- as a program

def main():
    """Serve like `ollama serve` on $OLLAMA_HOST (a loopback port) until SIGTERM, for tests that start a server the
    way a user would. $FAKE_OLLAMA_SCRIPT names a JSON file: a list of {"content": str, "tool_calls": [[name,
    arguments], ...]}."""
    import os
    import signal
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").split("://")[-1].rstrip("/")
    script = []
    if os.environ.get("FAKE_OLLAMA_SCRIPT"):
        with open(os.environ["FAKE_OLLAMA_SCRIPT"]) as f:
            script = [Reply(content=r.get("content", ""), tool_calls=[tuple(c) for c in r.get("tool_calls", [])])
                      for r in json.load(f)]
    fake = FakeOllama(script=script, port=int(host.rsplit(":", 1)[-1])).start()
    signal.signal(signal.SIGTERM, lambda *_: fake.stop())
    fake._thread.join()


if __name__ == "__main__":
    main()

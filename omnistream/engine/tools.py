"""Function calling in Qwen's chat-template format, and a grammar that forces a valid call.

The one copy of the tool-call rules, used by the conversation core
(:class:`omnistream.engine.conversation.Conversation`) on every path (in process, stage workers):

* **Offering tools** (:func:`tools_block`): Qwen2.5's chat template puts the function signatures in a
  system turn -- a ``# Tools`` section with one ``{"type": "function", "function": {...}}`` JSON line
  per tool inside ``<tools></tools>``, and the instruction to answer with
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. Qwen2.5-Omni checkpoints ship a
  chat template without a tools branch, so the text is written here exactly as Qwen2.5's
  ``tokenizer_config.json`` renders it (``tojson``: ``json.dumps`` with ``", "`` / ``": "``).
* **Reading calls** (:func:`parse_tool_calls`, :class:`CallSplitter`): with ``tool_choice`` ``auto`` the
  model writes a ``<tool_call>`` block freely; it is cut out of the spoken/visible text and parsed.
* **Tool outputs** (:func:`tool_response`): a ``function_call_output`` goes back as the user turn Qwen's
  template writes for a ``tool`` message: ``<tool_response>\\n...\\n</tool_response>``.
* **Forcing a call** (:class:`CallConstraint`): with ``required`` or a named function the reply is
  decoded under an xgrammar grammar built from the tools' JSON schemas -- ``<tool_call>\\n``, then an
  object whose ``name`` is one of the offered functions and whose ``arguments`` match that
  function's schema, then ``\\n</tool_call>`` and a stop token -- so that even a random-weight
  model produces a call that parses and validates. The mask is applied to one session's logits
  (its own matcher), so sessions batched in the same Thinker forward are unaffected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for annotations: the server process imports this module for check_tools
    import torch

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")
MODES = ("auto", "none", "required")


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made: ``arguments`` is the JSON text of the arguments object."""

    name: str
    arguments: str


def check_tools(tools) -> list[dict]:
    """Validate function tool definitions (``{type: "function", name, description?, parameters?}``)
    -> ``[{name, description, parameters}]``; ValueError names the bad field. A schema the grammar
    compiler cannot take is refused here, before any reply depends on it."""
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    if len(tools) > 128:
        raise ValueError("at most 128 tools are taken")
    out, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{where} must be an object")
        if t.get("type", "function") != "function":
            raise ValueError(f"{where}.type {t.get('type')!r} is not supported (only 'function')")
        unknown = set(t) - {"type", "name", "description", "parameters"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        name = t.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"{where}.name must be 1-64 letters, digits, '_' or '-'")
        if name in names:
            raise ValueError(f"{where}.name {name!r} is given twice")
        names.add(name)
        desc = t.get("description") or ""
        if not isinstance(desc, str) or len(desc) > 4096:
            raise ValueError(f"{where}.description must be a string of at most 4096 characters")
        params = t.get("parameters")
        params = {"type": "object", "properties": {}} if params is None else params
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ValueError(f"{where}.parameters must be a JSON schema of type 'object'")
        if len(json.dumps(params)) > 32768:
            raise ValueError(f"{where}.parameters is larger than 32 KiB")
        out.append({"name": name, "description": desc, "parameters": params})
    if out:
        try:
            _schema_grammar(json.dumps([t["parameters"] for t in out]), None)
        except Exception as e:  # noqa: BLE001 -- xgrammar raises several types on a schema it cannot take
            raise ValueError(f"tools: a parameters schema is not supported: {e}") from None
    return out


def check_tool_choice(choice, tools: list[dict]) -> str:
    """``auto`` | ``none`` | ``required`` | ``{"type": "function", "name": N}`` -> ``"auto"``,
    ``"none"``, ``"required"`` or ``"function:N"`` (N must be one of ``tools``)."""
    if isinstance(choice, str):
        if choice not in MODES:
            raise ValueError(f"tool_choice {choice!r}: use auto, none, required or {{'type': 'function', 'name': ...}}")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name", (choice.get("function") or {}).get("name") if isinstance(choice.get("function"),
                                                                                        dict) else None)
        if not isinstance(name, str) or name not in {t["name"] for t in tools}:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
        return f"function:{name}"
    raise ValueError("tool_choice must be auto, none, required or {'type': 'function', 'name': ...}")


def choice_json(choice: str):
    """The wire form of :func:`check_tool_choice`'s result, back in the protocol's shape."""
    return {"type": "function", "name": choice[9:]} if choice.startswith("function:") else choice


def tools_block(tools: list[dict]) -> str:
    """The ``# Tools`` section of Qwen2.5's system turn for ``tools`` (checked by :func:`check_tools`)."""
    lines = [json.dumps({"type": "function", "function": {k: v for k, v in t.items() if v or k != "description"}},
                        ensure_ascii=False) for t in tools]  # (an empty description is left out, as the client did)
    return _TOOLS_HEAD + "".join("\n" + s for s in lines) + _TOOLS_TAIL


def tool_response(output: str) -> str:
    """A function's output as the user turn Qwen's template writes for a ``tool`` message."""
    return f"<tool_response>\n{output}\n</tool_response>"


def format_call(call: ToolCall) -> str:
    """A call as the assistant writes it (what the grammar produces)."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments}}}\n{CALL_CLOSE}'


_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)
_ARGS_RE = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')  # up to the arguments


def _raw_arguments(body: str) -> str | None:
    """The arguments object's own text in a call written ``{"name": .., "arguments": {...}}`` (what
    was streamed, so the deltas add up to it exactly); None in any other layout."""
    m = _ARGS_RE.match(body)
    if m is None:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(body, m.end())
    except ValueError:
        return None
    return body[m.end():end]


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str, list[ToolCall]]:
    """Split a reply into its plain text and its ``<tool_call>`` blocks. A block that is not JSON, names
    no offered function or has no arguments object is not a call: it stays in the text."""
    names = {t["name"] for t in tools}
    calls, kept, pos = [], [], 0
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not (isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict)):
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        args = _raw_arguments(m.group(1)) or json.dumps(obj.get("arguments", {}), ensure_ascii=False)
        calls.append(ToolCall(obj["name"], args))
    kept.append(text[pos:])
    return "".join(kept).strip() if calls else text, calls


class CallSplitter:
    """Streaming text -> the part to show/speak: everything from a ``<tool_call>`` on is held back
    (and the tail that may be its beginning, until it is clearly not)."""

    def __init__(self):
        self.buf = ""
        self.calling = False  # a call began: nothing more is shown

    def push(self, text: str) -> str:
        if self.calling:
            return ""
        self.buf += text
        i = self.buf.find(CALL_OPEN)
        if i >= 0:
            self.calling = True
            out, self.buf = self.buf[:i], ""
            return out
        keep = next((k for k in range(min(len(CALL_OPEN) - 1, len(self.buf)), 0, -1)
                     if CALL_OPEN.startswith(self.buf[-k:])), 0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.calling else self.buf), ""
        return out


class ArgumentStream:
    """The first call of a reply as it is decoded: its function name once written, then the text of its
    arguments piece by piece (``response.function_call_arguments.delta``). ``push`` takes the reply's
    whole raw text so far and returns the new arguments text."""

    def __init__(self):
        self.name: str | None = None
        self._start: int | None = None  # where the arguments begin in the call's text
        self._sent = 0
        self.closed = False  # the arguments object is complete

    def push(self, raw: str) -> str:
        i = raw.find(CALL_OPEN)
        if i < 0 or self.closed:
            return ""
        body = raw[i + len(CALL_OPEN):].lstrip()
        if self._start is None:
            m = _ARGS_RE.match(body)
            if m is None:
                return ""
            try:
                self.name = json.loads(m.group(1))
            except ValueError:
                return ""
            self._start = m.end()
        args = body[self._start:]
        if not self._sent:  # whitespace before the object is not part of the arguments
            stripped = args.lstrip()
            if not stripped:
                return ""
            self._start += len(args) - len(stripped)
            args = stripped
        try:
            _, end = json.JSONDecoder().raw_decode(args)
            args, self.closed = args[:end], True
        except ValueError:
            pass  # still being written: all of it is arguments so far
        out, self._sent = args[self._sent:], len(args)
        return out


# ---------------------------------------------------------------------------------- constrained decoding
def _grammar_schema(schema):
    """``schema`` as the grammar gets it: a string with ``minLength``/``maxLength`` and no ``pattern``
    becomes a pattern of plain characters (no quote, backslash or control character) of that length.
    xgrammar's length-bounded strings let raw control characters through (seen: a forced call with
    ``\x1e`` in an argument, which no JSON parser takes), so the call would not be valid JSON."""
    if isinstance(schema, list):
        return [_grammar_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _grammar_schema(v) for k, v in schema.items()}
    if out.get("type") == "string" and "pattern" not in out and ("minLength" in out or "maxLength" in out):
        lo, hi = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = "^[^\"\\\\\\x00-\\x1f]{" + f"{lo},{'' if hi is None else int(hi)}" + "}$"
    return out


def _call_schema(tools: list[dict]) -> dict:
    """One JSON schema for ``{"name": N, "arguments": <N's parameters>}`` over the given tools (as the
    grammar gets them: :func:`_grammar_schema`)."""
    alts = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": _grammar_schema(t["parameters"])},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


@lru_cache(maxsize=64)
def _schema_grammar(params_json: str, tools_json: str | None):
    """xgrammar Grammar: with ``tools_json``, the whole ``<tool_call>`` block; else (a check only) the
    parameter schemas one by one."""
    import xgrammar as xgr

    if tools_json is None:
        return [xgr.Grammar.from_json_schema(json.dumps(p), any_whitespace=False) for p in json.loads(params_json)]
    body = xgr.Grammar.from_json_schema(json.dumps(_call_schema(json.loads(tools_json))), any_whitespace=False,
                                        separators=(", ", ": "))
    return xgr.Grammar.concat(xgr.Grammar.from_ebnf(f'root ::= "{CALL_OPEN}\\n"'), body,
                              xgr.Grammar.from_ebnf(f'root ::= "\\n{CALL_CLOSE}"'))


_COMPILERS: dict = {}


def _compiler(tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
    """One xgrammar compiler per (tokenizer, logits width, stop tokens): its token table is built once."""
    import xgrammar as xgr

    key = (id(tokenizer), vocab_size, stop_ids)
    if key not in _COMPILERS:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
        _COMPILERS[key] = (tokenizer, xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True))
    return _COMPILERS[key][1]


class CallConstraint:
    """Masks one reply's logits so that it can only be a valid call of one of ``tools``, then a stop
    token. ``tools``: the functions allowed (all offered ones for ``required``, one for a named choice)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids, tools: list[dict]):
        import xgrammar as xgr

        if not tools:
            raise ValueError("tool_choice forces a call but no tools are given")
        compiler = _compiler(tokenizer, vocab_size, tuple(sorted(int(s) for s in stop_ids)))
        grammar = _schema_grammar(json.dumps([t["parameters"] for t in tools]), json.dumps(tools))
        self.matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32
        self.vocab_size = vocab_size

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) with every token the grammar forbids next at -inf (a copy, on the CPU)."""
        import xgrammar as xgr

        self.matcher.fill_next_token_bitmask(self.bitmask)
        out = logits.detach().float().cpu().clone()  # (V,)
        xgr.apply_token_bitmask_inplace(out, self.bitmask)
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(int(token)):
            raise RuntimeError(f"token {token} breaks the tool-call grammar")

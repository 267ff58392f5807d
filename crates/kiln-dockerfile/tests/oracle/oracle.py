"""Differential-test oracle for kiln-dockerfile.

Reads one JSON document from stdin:
  {"files": [source, ...], "words": [{"word", "escape", "env"}...], "ignores": [{"patterns", "paths"}...]}
and writes the answers of the two reference implementations as JSON on stdout:
  - `dockerfile` (PyPI, embeds BuildKit's Go parser): parse_string
  - `e2b-dockerfile-utils` (Python port of BuildKit's parser, shell lexer and .dockerignore matcher)
Exit code 3 when an oracle package is missing.
"""
import json
import re
import sys

try:
    import dockerfile
    import e2b_dockerfile_utils as e2b
except ImportError as err:  # pragma: no cover
    print(f"oracle missing: {err}", file=sys.stderr)
    sys.exit(3)


def go_parse(src):
    try:
        cmds = dockerfile.parse_string(src)
    except Exception as err:  # GoParseError
        return {"error": str(err)}
    return {
        "instructions": [
            {
                "cmd": c.cmd or "",
                "sub_cmd": c.sub_cmd,
                "json": c.json,
                "original": c.original or "",
                "start_line": c.start_line,
                "end_line": c.end_line,
                "flags": list(c.flags),
                "value": list(c.value),
                "heredocs": [[h.name, h.file_descriptor, h.content] for h in c.heredocs],
            }
            for c in cmds
        ]
    }


def e2b_parse(src):
    try:
        ast = e2b.parse_dockerfile_ast(src)
    except Exception as err:
        return {"error": str(err), "line": getattr(err, "line", None)}
    return {
        "escape": ast.escape_token,
        "warnings": [w.message for w in ast.warnings],
        "instructions": [
            {
                "name": i.name,
                "original": i.original,
                "flags": list(i.flags),
                "args": list(i.args),
                "json": i.json,
                "start_line": i.start_line,
                "end_line": i.end_line,
                "heredocs": [[h.name, h.content, h.chomp, h.expand, h.file_descriptor] for h in i.heredocs],
            }
            for i in ast.instructions
        ],
    }


def expand(req):
    lex = e2b.ShellLex(req["escape"], env=req["env"], skip_unset_env=False)
    try:
        return {"value": lex.process_word(req["word"]), "words": lex.process_words(req["word"])}
    except Exception as err:
        return {"error": str(err)}


def ignore(req):
    try:
        m = e2b.PatternMatcher(req["patterns"])
    except Exception as err:
        return {"error": str(err)}
    return {"matches": [m.matches(p) for p in req["paths"]]}


def main():
    req = json.load(sys.stdin)
    out = {
        "files": [{"go": go_parse(s), "e2b": e2b_parse(s)} for s in req.get("files", [])],
        "words": [expand(w) for w in req.get("words", [])],
        "ignores": [ignore(i) for i in req.get("ignores", [])],
    }
    # Python's json keeps lone surrogates from "\ud800" escapes; Go turns them into U+FFFD.
    text = re.sub("[\ud800-\udfff]", "\ufffd", json.dumps(out, ensure_ascii=False))
    sys.stdout.buffer.write(text.encode("utf-8"))


main()

"""A small Dockerfile parser for tests that check the images without a Docker engine.

No Docker engine runs where the tests run, so ``tests/test_docker.py`` reads the Dockerfiles
itself. This follows Docker's own rules where our Dockerfiles depend on them (parser directives,
the escape character, continuation lines, comment lines inside a continued instruction, flags,
exec-form arguments, variable substitution, ``ENV``/``ARG`` forms, stages), so a check reads
what ``docker build`` would read; anything it cannot read faithfully (heredocs) it refuses
instead of guessing.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword, its ``--flag=value`` options, and the rest."""

    keyword: str
    value: str
    line: int
    flags: tuple[tuple[str, str], ...] = ()

    def flag(self, name: str) -> str | None:
        return next((v for k, v in self.flags if k == name), None)

    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form's arguments, or ``None`` for the shell form."""
        if not self.value.startswith("["):
            return None
        try:
            parsed = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed) else None

    def words(self) -> list[str]:
        return self.exec_form() or shlex.split(self.value, comments=False)


FLAGGED = {"FROM", "RUN", "COPY", "ADD", "HEALTHCHECK"}
"""Keywords whose leading ``--name=value`` options are split off into :attr:`Instruction.flags`."""
_DIRECTIVE = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(\S.*?)\s*$")
_FLAG = re.compile(r"^--([A-Za-z][\w-]*)(?:=(\S*))?\s+")
_HEREDOC = re.compile(r"(^|\s)<<-?\s*['\"]?[A-Za-z_]\w*['\"]?(\s|$)")


def parse_dockerfile(text: str) -> list[Instruction]:
    """Docker's rules: parser directives only at the very top; ``escape`` (default backslash)
    at the end of a line continues the instruction; comment lines, also inside a continued
    instruction, are dropped; keywords are case-insensitive. Heredocs are refused rather than
    misread (none of our Dockerfiles use them)."""
    lines = text.splitlines()
    escape, i = "\\", 0
    while i < len(lines) and (match := _DIRECTIVE.match(lines[i])):
        if match.group(1).lower() == "escape":
            escape = match.group(2)
        i += 1
    instructions: list[Instruction] = []
    while i < len(lines):
        start, current = i + 1, lines[i]
        i += 1
        if not current.strip() or current.lstrip().startswith("#"):
            continue
        parts = []
        while current.rstrip().endswith(escape):
            parts.append(current.rstrip()[: -len(escape)])
            while i < len(lines) and lines[i].lstrip().startswith("#"):
                i += 1
            if i >= len(lines):
                current = ""
                break
            current = lines[i]
            i += 1
        parts.append(current)
        joined = " ".join(p.strip() for p in parts if p.strip())
        keyword, _, rest = joined.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword in {"RUN", "COPY", "ADD"} and _HEREDOC.search(rest):
            raise ValueError(f"line {start}: heredocs are not supported by this parser")
        flags = []
        if keyword in FLAGGED:
            while match := _FLAG.match(rest + " "):
                flags.append((match.group(1), match.group(2) or ""))
                rest = (rest + " ")[match.end():].strip()
        instructions.append(Instruction(keyword, rest, start, tuple(flags)))
    return instructions


_VAR = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


def substitute(text: str, env: dict[str, str]) -> str:
    """``$VAR``, ``${VAR}`` and ``${VAR:-default}`` as Docker expands them in FROM and ENV."""
    def replace(match: re.Match[str]) -> str:
        value = env.get(match.group(1) or match.group(3), "")
        return match.group(2) if not value and match.group(2) is not None else value
    return _VAR.sub(replace, text)


def key_values(instruction: Instruction) -> dict[str, str]:
    """``ENV``/``ARG``/``LABEL`` pairs (``K=V ...``, or the legacy ``ENV K V``)."""
    words = shlex.split(instruction.value)
    if instruction.keyword == "ENV" and words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs = {}
    for word in words:
        name, sep, value = word.partition("=")
        pairs[name] = value if sep else ""
    return pairs


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions per build stage (each starting with its FROM); ARGs before the first FROM
    are returned as stage 0's prefix only through :func:`global_args`."""
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([ins])
        elif result:
            result[-1].append(ins)
    return result


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """The ARGs declared before the first FROM: the only variables a FROM line can use."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            args.update(key_values(ins))
    return args


def image_env(stage: list[Instruction]) -> dict[str, str]:
    """The environment a stage's ENV instructions leave (a later ENV overrides an earlier one)."""
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            env.update(key_values(ins))
    return env


def shell_commands(script: str) -> list[list[str]]:
    """A RUN line's simple commands, split at ``&&``, ``||``, ``;`` and ``|`` outside quotes."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]

"""Cedar source text: split a file into policy statements with positions, and
locate syntax errors.

cedarpy reports parse errors without a position ("unexpected token `}`"), so
leash tokenizes the text itself: enough to find statement boundaries (a `;`
outside strings and comments ends a policy) and to pin an error to the token
that caused it.
"""

from __future__ import annotations

import bisect

import cedarpy
import msgspec


class Diagnostic(msgspec.Struct, frozen=True):
    file: str
    line: int
    column: int
    message: str
    severity: str = "error"            # "error" | "warning"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.severity}: {self.message}"


class Token(msgspec.Struct, frozen=True):
    start: int                          # offset in the file text
    end: int
    text: str


class Statement(msgspec.Struct, frozen=True):
    """One policy's source: text[start:end] of the file, ending with ';'."""
    file: str
    start: int
    end: int
    line: int
    column: int
    tokens: tuple[Token, ...]
    terminated: bool                    # False: ran into the end of the file


class LexError(Exception):
    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


_PUNCT2 = ("::", "==", "!=", "<=", ">=", "&&", "||")


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith("//", i):
            nl = text.find("\n", i)
            i = n if nl < 0 else nl + 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                if text[j] == "\\":
                    j += 1
                elif text[j] == "\n":
                    break
                j += 1
            if j >= n or text[j] != '"':
                raise LexError(i, "unterminated string literal")
            tokens.append(Token(i, j + 1, text[i:j + 1]))
            i = j + 1
        elif c.isalnum() or c == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            tokens.append(Token(i, j, text[i:j]))
            i = j
        else:
            width = 2 if text[i:i + 2] in _PUNCT2 else 1
            tokens.append(Token(i, i + width, text[i:i + width]))
            i += width
    return tokens


class LineIndex:
    """Offset -> (line, column), both 1-based."""

    def __init__(self, text: str) -> None:
        self._starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]

    def position(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self._starts, offset) - 1
        return line + 1, offset - self._starts[line] + 1


def split_statements(file: str, text: str, lines: LineIndex) -> list[Statement]:
    """Raises LexError on an unterminated string."""
    statements: list[Statement] = []
    current: list[Token] = []

    def close(terminated: bool) -> None:
        first = current[0]
        line, col = lines.position(first.start)
        statements.append(Statement(file, first.start, current[-1].end, line, col,
                                    tuple(current), terminated))

    for tok in tokenize(text):
        current.append(tok)
        if tok.text == ";":
            close(True)
            current = []
    if current:
        close(False)
    return statements


def _is_eof_error(message: str) -> bool:
    return "unexpected end of input" in message


def locate_syntax_error(text: str, stmt: Statement) -> tuple[int, str]:
    """The offset of the token that makes `stmt` unparseable, and cedarpy's
    message for it. Grows a prefix of the statement one token at a time
    (bisecting): while the prefix is merely incomplete Cedar says "unexpected
    end of input"; the first token that turns that into another error is the
    culprit."""
    def error_of(k: int) -> str | None:
        snippet = text[stmt.start:stmt.tokens[k - 1].end]
        try:
            cedarpy.policies_to_pst(snippet)
        except ValueError as e:
            return str(e)
        return None

    full = error_of(len(stmt.tokens))
    if full is None:
        return stmt.start, "statement did not parse"
    if _is_eof_error(full):
        last = stmt.tokens[-1]
        return last.end, "unexpected end of input (missing `;` or a closing bracket?)"
    lo, hi = 1, len(stmt.tokens)       # smallest k whose prefix has a non-EOF error
    while lo < hi:
        mid = (lo + hi) // 2
        err = error_of(mid)
        if err is not None and not _is_eof_error(err):
            hi = mid
        else:
            lo = mid + 1
    return stmt.tokens[lo - 1].start, error_of(lo) or full

"""Mains Virtuelles: the daemon's own server-side tools for the `mongars` persona.

The persona may call these hands while it answers: a calculator, a clock, a unit converter, a
look at the board's health and a search of the caller's own memories. The daemon runs them
itself, so each one is safe by construction: no exec, eval, shell or subprocess, no file
access beyond the /sys thermal files (psutil reads /proc), every input and output bounded in
size, every call bounded in time. A hand that fails never raises out of `Hands.async_run`: the
model reads an `{"error": ...}` result instead. Tools a client declares in its own request are
never executed by the daemon; they go back to the client as tool calls.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import os
import re
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psutil
import structlog

from mongarsd.errors import MongarsError, UnavailableError
from mongarsd.mesh.local import read_temperature
from mongarsd.sanitize import clean_text

if TYPE_CHECKING:
    from mongarsd.memory.hippocampus import Hippocampus

log = structlog.get_logger("mongarsd.cognition.hands")

ALL_ROLES: Final = frozenset({"admin", "user", "peer"})
LOCAL_ROLES: Final = frozenset({"admin", "user"})  # hands that read this board or a user's data

MAX_RESULT_CHARS: Final = 4000  # content fed back to the model
MAX_ERROR_CHARS: Final = 500
MAX_NAME_CHARS: Final = 64  # OpenAI function names: [a-zA-Z0-9_-]{1,64}
MAX_STRING_ARG_CHARS: Final = 1000  # any string argument, whatever a custom hand's schema says
MAX_SCHEMA_MAX_LENGTH: Final = 200  # schemas are compiled into a llama.cpp grammar: keep them small
MAX_SCHEMA_PATTERN_CHARS: Final = 100
MAX_REQUEST_SCAN_CHARS: Final = 2000  # `requested` reads this much of a message
DEFAULT_TIMEOUT_S: Final = 2.0
CALCULATOR_TIMEOUT_S: Final = 1.0
CONVERT_TIMEOUT_S: Final = 1.0
CLOCK_TIMEOUT_S: Final = 2.0
SYSTEM_STATUS_TIMEOUT_S: Final = 2.0
MEMORY_SEARCH_TIMEOUT_S: Final = 5.0  # embeds the query: slow on a Pi 4 under load

# Calculator bounds: each check runs before the operation, so no input can make it slow.
MAX_EXPRESSION_CHARS: Final = 200
# The grammar keeps arguments to the characters they can hold: a small model that "closes" the
# JSON inside the string (`"17 * 23},"`) cannot, so the expression stays readable.
EXPRESSION_PATTERN = "^[0-9a-z .+*/^%()-]+$"  # no comma: small models end the string with one
UNIT_PATTERN = "^[A-Za-z0-9/_. °]+$"
MAX_EXPRESSION_NODES: Final = 64
MAX_EXPONENT: Final = 1000
MAX_POWER_LOG10: Final = 300  # a ** b must stay below 10**300 in magnitude
MAX_INT_DIGITS: Final = 300  # longer integers continue as floats (refused past float range)
MAX_FACTORIAL: Final = 170  # 171! overflows a float
MAX_ROUND_DIGITS: Final = 300  # round(5, -10**100) would compute 10**(10**100)
CALC_SIGNIFICANT_DIGITS: Final = 12
CONVERT_SIGNIFICANT_DIGITS: Final = 10
EXACT_FLOAT_INT: Final = 2**53  # integral floats below this are shown as ints (6/3 -> 2)

MAX_UNIT_CHARS: Final = 32
MAX_TIMEZONE_CHARS: Final = 64
MAX_QUERY_CHARS: Final = 200
MEMORY_DEFAULT_LIMIT: Final = 5
MEMORY_MAX_LIMIT: Final = 10
MEMORY_TEXT_CHARS: Final = 500
MEMORY_RESULT_BUDGET_CHARS: Final = 3500  # the memories' JSON, leaving room for the envelope

THERMAL_DIR: Final = "/sys/class/thermal"
MAX_THERMAL_ZONES: Final = 32
THERMAL_READ_BYTES: Final = 32
THERMAL_RANGE_C: Final = (-40.0, 150.0)  # readings outside are sensor garbage
MB: Final = 2**20

_INT_LIMIT: Final = 10**MAX_INT_DIGITS
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TIMEZONE_RE: Final = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+){0,2}")
_WEEKDAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

Number = int | float


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class HandContext:
    """Who runs a hand and what it may reach."""

    user: str  # the caller: memory search sees only this user's memories
    role: str  # "admin" | "user" | "peer"
    hippocampus: Hippocampus | None = None
    board: str = "generic"  # board profile name
    timezone: str | None = None  # IANA name configured for the board; None: the system's local time


@dataclass(frozen=True, slots=True)
class HandResult:
    name: str
    ok: bool
    content: str  # compact JSON fed back to the model, at most MAX_RESULT_CHARS
    data: Any = None  # the structured result (JSON-able) for history and logs
    elapsed_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Hand:
    name: str
    description: str  # one short sentence for the model
    parameters: Mapping[str, Any]  # simple JSON Schema of an object (compiled into a grammar)
    run: Callable[[Mapping[str, Any], HandContext], Awaitable[Any]]  # returns a JSON-able value
    timeout_s: float = DEFAULT_TIMEOUT_S
    roles: frozenset[str] = ALL_ROLES
    aliases: tuple[str, ...] = ()  # what a user says when asking for this hand by name


# ------------------------------------------------------------------------------ pure helpers


def _round_significant(value: float, digits: int) -> Number:
    """Round to DIGITS significant digits; an integral result below 2**53 becomes an int."""
    rounded = float(f"{value:.{digits}g}")
    if rounded.is_integer() and abs(rounded) < EXACT_FLOAT_INT:
        return int(rounded)
    return rounded


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_message(err: BaseException) -> str:
    # KeyError's str() is the repr of its key; a LookupError raised with a sentence reads better bare.
    bare = isinstance(err, LookupError) and len(err.args) == 1 and isinstance(err.args[0], str)
    text = err.args[0] if bare else str(err)
    return _shorten(text or type(err).__name__, MAX_ERROR_CHARS)


def _where(err: BaseException, depth: int = 3) -> str:
    """Name the innermost frames of ERR's traceback without reading source files (safe in the loop)."""
    frames = [f"{frame.f_code.co_filename}:{line} in {frame.f_code.co_name}" for frame, line in traceback.walk_tb(err.__traceback__)]
    return " <- ".join(reversed(frames[-depth:]))


def encode_content(key: str, value: Any) -> str:
    """Serialize {KEY: VALUE} as compact JSON of at most MAX_RESULT_CHARS (pure).

    A longer one keeps KEY, with the start of VALUE's JSON as a string and `"truncated": true`.
    Raises TypeError or ValueError when VALUE is not JSON (an object, NaN, infinity).
    """
    text = json.dumps({key: value}, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if len(text) <= MAX_RESULT_CHARS:
        return text
    inner = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    keep = MAX_RESULT_CHARS - 40
    while True:
        # Escapes lengthen the partial text; each pass shortens it by at least the overshoot.
        cut = json.dumps({"truncated": True, key: inner[:keep]}, ensure_ascii=False, separators=(",", ":"))
        if len(cut) <= MAX_RESULT_CHARS:
            return cut
        keep = max(0, keep - (len(cut) - MAX_RESULT_CHARS))


_JSON_TYPES: Final[Mapping[str, Callable[[Any], bool]]] = {
    "string": lambda v: isinstance(v, str),
    # as api/validation: 3.0 is an integer (JSON Schema 2020-12 agrees), a bool is not
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v)),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, Mapping),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def _kinds_of(spec: Mapping[str, Any]) -> list[str]:
    """Return the JSON types a property schema declares (empty: any) (pure)."""
    kinds = spec.get("type")
    if kinds is None:
        return []
    return [kinds] if isinstance(kinds, str) else [k for k in kinds if isinstance(k, str)]


def _check_value(name: str, spec: Mapping[str, Any], value: Any) -> Any:
    wanted = _kinds_of(spec)
    if wanted and not any(_JSON_TYPES.get(kind, lambda _v: True)(value) for kind in wanted):
        raise ValueError(f"argument '{name}' must be {' or '.join(wanted)}, not {type(value).__name__}")
    if isinstance(value, float) and value.is_integer() and "integer" in wanted:
        value = int(value)
    if isinstance(value, str):
        value = clean_text(value)
        longest = min(int(spec.get("maxLength", MAX_STRING_ARG_CHARS)), MAX_STRING_ARG_CHARS)
        if len(value) > longest:
            raise ValueError(f"argument '{name}' is too long ({len(value)} characters; at most {longest})")
        if len(value) < int(spec.get("minLength", 0)):
            raise ValueError(f"argument '{name}' must have at least {spec['minLength']} characters")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in spec and value < spec["minimum"]:
            raise ValueError(f"argument '{name}' must be at least {spec['minimum']}")
        if "maximum" in spec and value > spec["maximum"]:
            raise ValueError(f"argument '{name}' must be at most {spec['maximum']}")
    if "enum" in spec and value not in spec["enum"]:
        raise ValueError(f"argument '{name}' must be one of " + ", ".join(json.dumps(v) for v in spec["enum"]))
    return value


def validate_arguments(schema: Mapping[str, Any], arguments: Any) -> dict[str, Any]:
    """Check ARGUMENTS against a hand's simple JSON Schema; return a cleaned copy or raise ValueError naming the argument (pure)."""
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise ValueError(f"arguments must be a JSON object, not {type(arguments).__name__}")
    properties: Mapping[str, Any] = schema.get("properties") or {}
    for key in arguments:
        if not isinstance(key, str):
            raise ValueError("argument names must be strings")
        if key not in properties and schema.get("additionalProperties") is False:
            raise ValueError(f"unexpected argument '{_shorten(key, MAX_NAME_CHARS)}'")
    for key in schema.get("required") or ():
        if key not in arguments:
            raise ValueError(f"missing required argument '{key}'")
    return {key: _check_value(key, properties.get(key) or {}, value) for key, value in arguments.items()}


def _check_schema(hand: Hand) -> None:
    """Refuse a hand whose schema the grammar compiler should not see (pure; ValueError)."""
    params = hand.parameters
    if params.get("type") != "object" or not isinstance(params.get("properties", {}), Mapping):
        raise ValueError(f"hand {hand.name!r}: parameters must be a JSON Schema object with properties")
    if "$ref" in json.dumps(params):
        raise ValueError(f"hand {hand.name!r}: $ref is not supported in tool schemas")
    for key, spec in params.get("properties", {}).items():
        if int(spec.get("maxLength", 0)) > MAX_SCHEMA_MAX_LENGTH:
            raise ValueError(f"hand {hand.name!r}: argument {key!r} has maxLength over {MAX_SCHEMA_MAX_LENGTH}")
        if len(str(spec.get("pattern", ""))) > MAX_SCHEMA_PATTERN_CHARS:
            raise ValueError(f"hand {hand.name!r}: argument {key!r} has a pattern over {MAX_SCHEMA_PATTERN_CHARS} characters")


def _plain(value: Any) -> Any:
    """Copy a schema into plain dicts and lists (the caller may serialize or mutate it)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------ calculator

_CONSTANTS: Final[Mapping[str, float]] = {"pi": math.pi, "e": math.e, "tau": math.tau}
_FUNCTION_ARITY: Final[Mapping[str, tuple[int, int]]] = {
    "sqrt": (1, 1),
    "abs": (1, 1),
    "round": (1, 2),
    "floor": (1, 1),
    "ceil": (1, 1),
    "log": (1, 2),
    "log10": (1, 1),
    "log2": (1, 1),
    "exp": (1, 1),
    "sin": (1, 1),
    "cos": (1, 1),
    "tan": (1, 1),
    "asin": (1, 1),
    "acos": (1, 1),
    "atan": (1, 1),
    "min": (1, MAX_EXPRESSION_NODES),
    "max": (1, MAX_EXPRESSION_NODES),
    "factorial": (1, 1),
}
_MATH_FUNCTIONS: Final[Mapping[str, Callable[[float], Number]]] = {
    "sqrt": math.sqrt,
    "floor": math.floor,
    "ceil": math.ceil,
    "log10": math.log10,
    "log2": math.log2,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
}
_OPERATOR_SYMBOLS: Final[Mapping[type[ast.AST], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.Invert: "~",
    ast.Not: "not",
}
_REFUSED_NODES: Final[Mapping[type[ast.AST], str]] = {
    ast.Attribute: "attribute access",
    ast.Lambda: "lambda",
    ast.Subscript: "indexing",
    ast.Compare: "comparison",
    ast.BoolOp: "boolean logic",
    ast.IfExp: "a conditional expression",
    ast.NamedExpr: "assignment",
    ast.List: "a list",
    ast.Set: "a set",
    ast.Dict: "a dict",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.JoinedStr: "a string",
    ast.Starred: "unpacking",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
# "0x1F": refused by name, else the "x means times" rule below would read it as 0 * 1F.
_HEX_RE: Final = re.compile(r"(?<![\w.])0[xX][0-9A-Fa-f]")
_TIMES_X_RE: Final = re.compile(r"(?<=[\d.)])\s*[xX×]\s*(?=[\d.(])")
_SYMBOLS: Final = str.maketrans({"×": "*", "÷": "/", "−": "-", "^": "**"})


def _number(value: Number) -> Number:
    """Keep ints exact below 10**MAX_INT_DIGITS, continue larger ones as floats; refuse infinity."""
    if isinstance(value, int):
        if -_INT_LIMIT < value < _INT_LIMIT:
            return value
        try:
            value = float(value)
        except OverflowError:
            raise OverflowError("the result is too large") from None
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if not math.isfinite(value):
        raise OverflowError("the result is too large")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"the exponent is too large (at most {MAX_EXPONENT} in magnitude)")
    if base == 0:
        if exponent < 0:
            raise ZeroDivisionError("0 cannot be raised to a negative power")
    elif abs(base) != 1 and math.log10(abs(base)) * exponent >= MAX_POWER_LOG10:
        raise OverflowError(f"the result of ** is too large (at most 10**{MAX_POWER_LOG10} in magnitude)")
    result: Any = base**exponent
    if isinstance(result, complex):
        raise ValueError("a negative number raised to a fractional power is not a real number")
    return _number(result)


def _binary(op: ast.operator, left: Number, right: Number) -> Number:
    if isinstance(op, ast.Pow):
        return _power(left, right)
    try:
        if isinstance(op, ast.Add):
            return _number(left + right)
        if isinstance(op, ast.Sub):
            return _number(left - right)
        if isinstance(op, ast.Mult):
            return _number(left * right)
        if isinstance(op, ast.Div):
            return _number(left / right)
        if isinstance(op, ast.FloorDiv):
            return _number(left // right)
        if isinstance(op, ast.Mod):
            return _number(left % right)
    except ZeroDivisionError:
        raise ZeroDivisionError("division by zero") from None
    except OverflowError:
        raise OverflowError("the result is too large") from None
    raise ValueError(f"operator '{_OPERATOR_SYMBOLS.get(type(op), type(op).__name__)}' is not allowed")


def _as_int(name: str, value: Number) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name}() needs a whole number, not {value:g}")
        return int(value)
    return value


def _call(name: str, args: list[Number]) -> Number:
    least, most = _FUNCTION_ARITY[name]
    if not least <= len(args) <= most:
        wanted = str(least) if least == most else f"{least} to {most}"
        raise ValueError(f"{name}() takes {wanted} argument{'s' if most > 1 else ''}, not {len(args)}")
    shown = ", ".join(f"{a:g}" if isinstance(a, float) else str(a) for a in args)
    try:
        if name == "abs":
            return _number(abs(args[0]))
        if name in ("min", "max"):
            return min(args) if name == "min" else max(args)
        if name == "round":
            if len(args) == 1:
                return _number(round(args[0]))
            digits = _as_int("round", args[1])
            if abs(digits) > MAX_ROUND_DIGITS:
                raise ValueError(f"round() takes at most {MAX_ROUND_DIGITS} digits")
            return _number(round(args[0], digits))
        if name == "factorial":
            n = _as_int("factorial", args[0])
            if not 0 <= n <= MAX_FACTORIAL:
                raise ValueError(f"factorial() takes a whole number from 0 to {MAX_FACTORIAL}, not {n}")
            return _number(math.factorial(n))
        if name == "log":
            return _number(math.log(args[0]) if len(args) == 1 else math.log(args[0], args[1]))
        return _number(_MATH_FUNCTIONS[name](args[0]))
    except OverflowError:
        raise OverflowError(f"{name}({shown}) is too large") from None
    except (ValueError, ZeroDivisionError) as err:
        if str(err).startswith(name):
            raise  # already names the function (round, factorial)
        raise ValueError(f"{name}() is not defined for {shown}") from None


def _evaluate(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{_shorten(repr(value), 40)} is not a number")
        return _number(value)
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ValueError(f"unknown name '{node.id}' (known: {', '.join(_CONSTANTS)})")
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -_evaluate(node.operand)
        if isinstance(node.op, ast.UAdd):
            return +_evaluate(node.operand)
        raise ValueError(f"operator '{_OPERATOR_SYMBOLS.get(type(node.op), type(node.op).__name__)}' is not allowed")
    if isinstance(node, ast.BinOp):
        return _binary(node.op, _evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            what = _REFUSED_NODES.get(type(node.func))
            raise ValueError(f"{what} is not allowed in a calculation" if what else "only the calculator's own functions can be called")
        name = node.func.id
        if name not in _FUNCTION_ARITY:
            raise ValueError(f"unknown function '{_shorten(name, MAX_NAME_CHARS)}' (known: {', '.join(_FUNCTION_ARITY)})")
        if node.keywords:
            raise ValueError(f"{name}() takes no keyword arguments")
        return _call(name, [_evaluate(arg) for arg in node.args])
    if isinstance(node, ast.Tuple):
        raise ValueError("',' may only separate function arguments: write 1234.5, not 1,234.5 or 1234,5")
    what = _REFUSED_NODES.get(type(node), type(node).__name__)
    raise ValueError(f"{what} is not allowed in a calculation")


def calculate(expression: str) -> dict[str, Any]:
    """Evaluate an arithmetic EXPRESSION safely: a walk over its syntax tree, every step bounded (pure).

    Raises ValueError, ZeroDivisionError or OverflowError with a message the model can read.
    """
    text = expression.strip()
    if not text:
        raise ValueError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is too long ({len(text)} characters; at most {MAX_EXPRESSION_CHARS})")
    if _HEX_RE.search(text):
        raise ValueError("hexadecimal numbers are not supported")
    text = _TIMES_X_RE.sub("*", text.translate(_SYMBOLS))
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot read the expression: {err.msg}") from None
    except (ValueError, RecursionError, MemoryError):  # NUL bytes, nesting the parser refuses
        raise ValueError("cannot read the expression") from None
    nodes = sum(isinstance(n, ast.expr) for n in ast.walk(tree))
    if nodes > MAX_EXPRESSION_NODES:
        raise ValueError(f"the expression is too complex ({nodes} parts; at most {MAX_EXPRESSION_NODES})")
    value = _evaluate(tree.body)
    result = value if isinstance(value, int) else _round_significant(value, CALC_SIGNIFICANT_DIGITS)
    return {"expression": ast.unparse(tree), "result": result}


async def _async_calculator(args: Mapping[str, Any], ctx: HandContext) -> Any:
    return calculate(str(args["expression"]))


# ------------------------------------------------------------------------------ clock


def _load_zone(name: str) -> tzinfo:
    """Load an IANA time zone or raise LookupError naming it (blocking: reads the tz database; thread)."""
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return UTC  # also on a board without a tz database
    if not _TIMEZONE_RE.fullmatch(name):
        raise LookupError(f"unknown time zone '{_shorten(name, MAX_TIMEZONE_CHARS)}' (use an IANA name such as Europe/Paris)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise LookupError(f"unknown time zone '{name}' (use an IANA name such as Europe/Paris)") from None


def describe_time(now: datetime, zone_name: str) -> dict[str, Any]:
    """Describe an aware datetime for the model (pure)."""
    offset = now.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return {
        "datetime": now.isoformat(timespec="seconds"),
        "date": now.strftime("%Y-%m-%d"),
        "time": now.strftime("%H:%M:%S"),
        "weekday": _WEEKDAYS[now.weekday()],  # not %A: that follows the process locale
        "timezone": zone_name,
        "utc_offset": f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}",
    }


async def _async_clock(args: Mapping[str, Any], ctx: HandContext) -> Any:
    name = args.get("timezone") or ctx.timezone
    if name:
        zone = await asyncio.to_thread(_load_zone, name)
        return describe_time(datetime.now(zone), "UTC" if zone is UTC else name)
    now = datetime.now().astimezone()  # the system's local zone; its IANA name is not ours to read
    return describe_time(now, now.tzname() or "local")


# ------------------------------------------------------------------------------ units


@dataclass(frozen=True, slots=True)
class Unit:
    name: str
    kind: str
    factor: float  # in the kind's base unit (m, kg, l, m/s, s, B); unused for temperature


def _units() -> dict[str, Unit]:
    table: dict[str, Unit] = {}

    def add(kind: str, name: str, factor: float, *aliases: str) -> None:
        unit = Unit(name, kind, factor)
        for alias in (name, *aliases):
            table[alias.lower()] = unit

    add("length", "mm", 1e-3, "millimeter", "millimetre")
    add("length", "cm", 1e-2, "centimeter", "centimetre")
    add("length", "m", 1.0, "meter", "metre")
    add("length", "km", 1e3, "kilometer", "kilometre")
    add("length", "in", 0.0254, "inch", "inches")
    add("length", "ft", 0.3048, "foot", "feet")
    add("length", "yd", 0.9144, "yard")
    add("length", "mi", 1609.344, "mile")
    add("length", "nmi", 1852.0, "nautical mile")
    add("mass", "mg", 1e-6, "milligram", "milligramme")
    add("mass", "g", 1e-3, "gram", "gramme")
    add("mass", "kg", 1.0, "kilogram", "kilogramme", "kilo")
    add("mass", "t", 1e3, "tonne", "metric ton")
    add("mass", "oz", 0.028349523125, "ounce")
    add("mass", "lb", 0.45359237, "pound", "lbs")
    add("mass", "st", 6.35029318, "stone")
    add("temperature", "C", 0.0, "celsius", "degc", "deg c", "degree celsius", "degrees celsius", "centigrade")
    add("temperature", "F", 0.0, "fahrenheit", "degf", "deg f", "degree fahrenheit", "degrees fahrenheit")
    add("temperature", "K", 0.0, "kelvin")
    add("volume", "ml", 1e-3, "milliliter", "millilitre", "cc", "cm3")
    add("volume", "cl", 1e-2, "centiliter", "centilitre")
    add("volume", "dl", 1e-1, "deciliter", "decilitre")
    add("volume", "l", 1.0, "liter", "litre", "lt")
    add("volume", "m3", 1e3, "cubic meter", "cubic metre", "m^3")
    add("volume", "tsp", 0.00492892159375, "teaspoon")
    add("volume", "tbsp", 0.01478676478125, "tablespoon")
    add("volume", "cup", 0.2365882365, "us cup")
    add("volume", "pt", 0.473176473, "pint", "us pint")
    add("volume", "qt", 0.946352946, "quart", "us quart")
    add("volume", "gal", 3.785411784, "gallon", "us gallon")
    add("volume", "fl_oz", 0.0295735295625, "fl oz", "floz", "fluid ounce", "us fluid ounce")
    add("speed", "m/s", 1.0, "mps", "meter per second", "metre per second", "meters per second", "metres per second")
    add(
        "speed",
        "km/h",
        1 / 3.6,
        "kmh",
        "kph",
        "km/hr",
        "kilometer per hour",
        "kilometre per hour",
        "kilometers per hour",
        "kilometres per hour",
    )
    add("speed", "mph", 0.44704, "mi/h", "mile per hour", "miles per hour")
    add("speed", "kn", 1852 / 3600, "knot")
    add("time", "ms", 1e-3, "millisecond", "msec")
    add("time", "s", 1.0, "second", "sec")
    add("time", "min", 60.0, "minute")
    add("time", "h", 3600.0, "hour", "hr")
    add("time", "day", 86400.0, "d")
    add("time", "week", 604800.0, "wk")
    add("data", "bit", 0.125, "b")  # lower-case b; "B" is matched before lowering
    add("data", "B", 1.0, "byte", "octet")
    add("data", "kB", 1e3, "kilobyte")
    add("data", "MB", 1e6, "megabyte")
    add("data", "GB", 1e9, "gigabyte")
    add("data", "TB", 1e12, "terabyte")
    add("data", "KiB", 2.0**10, "kibibyte")
    add("data", "MiB", 2.0**20, "mebibyte")
    add("data", "GiB", 2.0**30, "gibibyte")
    add("data", "TiB", 2.0**40, "tebibyte")
    return table


_UNITS: Final = _units()
_UNIT_KINDS: Final = ("length", "mass", "temperature", "volume", "speed", "time", "data")


def find_unit(text: str) -> Unit:
    """Find a unit by symbol or name, case-insensitively, plural or not; raise ValueError naming it (pure)."""
    key = " ".join(text.replace("°", " ").replace("³", "3").replace("²", "2").split()).lower()
    if text.strip() == "B":
        key = "byte"  # the one place case matters: B is a byte, b a bit
    key = key.removeprefix("degrees ").removeprefix("degree ") if key not in _UNITS else key
    for candidate in (key, key.removesuffix("s"), key.removesuffix("es")):
        unit = _UNITS.get(candidate)
        if unit is not None:
            return unit
    raise ValueError(f"unknown unit '{_shorten(text, MAX_UNIT_CHARS)}' (kinds known: {', '.join(_UNIT_KINDS)})")


def _to_kelvin(unit: str, value: float) -> float:
    return value + 273.15 if unit == "C" else (value - 32) * 5 / 9 + 273.15 if unit == "F" else value


def _from_kelvin(unit: str, kelvin: float) -> float:
    return kelvin - 273.15 if unit == "C" else (kelvin - 273.15) * 9 / 5 + 32 if unit == "F" else kelvin


def convert(value: float, from_unit: str, to_unit: str) -> dict[str, Any]:
    """Convert VALUE between two units of the same kind, rounded to 10 significant digits (pure)."""
    src, dst = find_unit(from_unit), find_unit(to_unit)
    try:
        value = float(value) if isinstance(value, int) and abs(value) >= _INT_LIMIT else value
    except OverflowError:
        raise OverflowError("the value is too large") from None
    if src.kind != dst.kind:
        raise ValueError(f"cannot convert {src.name} ({src.kind}) to {dst.name} ({dst.kind})")
    if src.kind == "temperature":
        kelvin = _to_kelvin(src.name, value)
        if kelvin < 0:
            raise ValueError(f"{value:g} {src.name} is below absolute zero")
        result = value if src.name == dst.name else _from_kelvin(dst.name, kelvin)
    else:
        result = value * src.factor / dst.factor
    if not math.isfinite(result):
        raise OverflowError("the result is too large")
    return {
        "value": value,
        "from_unit": src.name,
        "to_unit": dst.name,
        "result": _round_significant(result, CONVERT_SIGNIFICANT_DIGITS),
    }


async def _async_convert_units(args: Mapping[str, Any], ctx: HandContext) -> Any:
    return convert(args["value"], str(args["from_unit"]), str(args["to_unit"]))


# ------------------------------------------------------------------------------ system status


def read_thermal_zones(root: str | None = None) -> float | None:
    """Return the hottest /sys thermal zone in °C, None when there is none (blocking: reads sysfs; thread)."""
    root = THERMAL_DIR if root is None else root
    try:
        zones = sorted(n for n in os.listdir(root) if n.startswith("thermal_zone"))[:MAX_THERMAL_ZONES]
    except OSError:
        return None
    hottest: float | None = None
    for zone in zones:
        try:
            with open(os.path.join(root, zone, "temp"), "rb") as fh:
                celsius = int(fh.read(THERMAL_READ_BYTES).strip()) / 1000
        except (OSError, ValueError):  # a zone that is off, or a driver that answers garbage
            continue
        if THERMAL_RANGE_C[0] <= celsius <= THERMAL_RANGE_C[1]:
            hottest = celsius if hottest is None else max(hottest, celsius)
    return hottest


def system_status(board: str) -> dict[str, Any]:
    """Collect the board's load, memory, uptime and temperature, no host names (blocking: psutil reads /proc; thread)."""
    out: dict[str, Any] = {"board": board, "cpu_count": psutil.cpu_count(logical=True) or os.cpu_count()}
    now = time.time()
    try:
        out["load_avg"] = [round(x, 2) for x in psutil.getloadavg()]
    except OSError:
        out["load_avg"] = None
    # Since the previous call: the first one in a process reads 0.0 (psutil.cpu_percent docs).
    out["cpu_percent"] = psutil.cpu_percent(interval=None)
    try:
        vm = psutil.virtual_memory()
        out["memory_total_mb"] = round(vm.total / MB)
        out["memory_available_mb"] = round(vm.available / MB)
        out["memory_percent"] = vm.percent
    except OSError:
        out.update(memory_total_mb=None, memory_available_mb=None, memory_percent=None)
    try:
        proc = psutil.Process(os.getpid())
        out["process_rss_mb"] = round(proc.memory_info().rss / MB, 1)
        out["process_uptime_s"] = round(now - proc.create_time())
    except (OSError, psutil.Error):
        out.update(process_rss_mb=None, process_uptime_s=None)
    try:
        out["uptime_s"] = round(now - psutil.boot_time())
    except (OSError, psutil.Error):
        out["uptime_s"] = None
    celsius, throttled = read_temperature()
    if celsius is None:
        celsius = read_thermal_zones()
    out["temperature_c"] = None if celsius is None else round(celsius, 1)
    out["throttled"] = throttled
    return out


async def _async_system_status(args: Mapping[str, Any], ctx: HandContext) -> Any:
    return await asyncio.to_thread(system_status, ctx.board)


# ------------------------------------------------------------------------------ memory search


async def _async_memory_search(args: Mapping[str, Any], ctx: HandContext) -> Any:
    if ctx.hippocampus is None:
        raise UnavailableError("memory is not enabled")
    query = str(args["query"]).strip()
    if not query:
        raise ValueError("argument 'query' must not be blank")
    recall = await ctx.hippocampus.async_recall(ctx.user, query, int(args.get("limit", MEMORY_DEFAULT_LIMIT)))
    memories: list[dict[str, Any]] = []
    used = omitted = 0
    for hit in recall.hits:
        item = {
            "text": _shorten(hit.memory.text, MEMORY_TEXT_CHARS),
            "created_at": datetime.fromtimestamp(hit.memory.created_at, UTC).isoformat(timespec="seconds"),
            "score": round(hit.score, 4),
        }
        size = len(json.dumps(item, ensure_ascii=False)) + 1
        if used + size > MEMORY_RESULT_BUDGET_CHARS:
            omitted += 1  # ranked best first: what no longer fits matters least
            continue
        used += size
        memories.append(item)
    out: dict[str, Any] = {"memories": memories}
    if omitted:
        out["omitted"] = omitted
    if recall.degraded:
        out["note"] = "full-text search only: the embedding model is unavailable"
    return out


# ------------------------------------------------------------------------------ built-ins


def _object_schema(properties: Mapping[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": dict(properties), "required": list(required), "additionalProperties": False}


CALCULATOR: Final = "calculator"
CLOCK: Final = "clock"
CONVERT_UNITS: Final = "convert_units"
SYSTEM_STATUS: Final = "system_status"
MEMORY_SEARCH: Final = "memory_search"


def default_hands() -> list[Hand]:
    """Build the built-in hands, in the order the model sees them."""
    return [
        Hand(
            name=CALCULATOR,
            description="Evaluate an arithmetic expression exactly (+ - * / // % **, sqrt, log, sin, factorial, pi, e).",
            parameters=_object_schema(
                {"expression": {"type": "string", "pattern": EXPRESSION_PATTERN, "minLength": 1, "maxLength": MAX_EXPRESSION_CHARS}},
                ["expression"],
            ),
            run=_async_calculator,
            timeout_s=CALCULATOR_TIMEOUT_S,
            aliases=("calculator", "calculate", "compute", "calculatrice", "calculette", "calculer", "calcule"),
        ),
        Hand(
            name=CLOCK,
            description="Tell the current date, time and weekday, optionally in an IANA time zone such as Europe/Paris.",
            parameters=_object_schema({"timezone": {"type": "string", "pattern": "^[A-Za-z0-9/_+-]+$", "maxLength": MAX_TIMEZONE_CHARS}}),
            run=_async_clock,
            timeout_s=CLOCK_TIMEOUT_S,
            aliases=(
                "clock",
                "what time is it",
                "what's the time",
                "what is the time",
                "current time",
                "what's the date",
                "what is the date",
                "today's date",
                "what day is it",
                "what day is today",
                "quelle heure",
                "quel jour sommes-nous",
            ),
        ),
        Hand(
            name=CONVERT_UNITS,
            description="Convert a value between units of length, mass, temperature, volume, speed, time or data size.",
            parameters=_object_schema(
                {
                    "value": {"type": "number"},
                    "from_unit": {"type": "string", "pattern": UNIT_PATTERN, "maxLength": MAX_UNIT_CHARS},
                    "to_unit": {"type": "string", "pattern": UNIT_PATTERN, "maxLength": MAX_UNIT_CHARS},
                },
                ["value", "from_unit", "to_unit"],
            ),
            run=_async_convert_units,
            timeout_s=CONVERT_TIMEOUT_S,
            aliases=("unit converter", "unit conversion", "convert units", "convertisseur"),
        ),
        Hand(
            name=SYSTEM_STATUS,
            description="Report this board's CPU load, memory, uptime and temperature.",
            parameters=_object_schema({}),
            run=_async_system_status,
            timeout_s=SYSTEM_STATUS_TIMEOUT_S,
            roles=LOCAL_ROLES,
            aliases=(
                "system status",
                "board status",
                "cpu load",
                "cpu usage",
                "cpu temperature",
                "board temperature",
                "memory usage",
                "ram usage",
                "uptime",
            ),
        ),
        Hand(
            name=MEMORY_SEARCH,
            description="Search what you remember about the current user (their own memories only).",
            parameters=_object_schema(
                {
                    "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MEMORY_MAX_LIMIT},
                },
                ["query"],
            ),
            run=_async_memory_search,
            timeout_s=MEMORY_SEARCH_TIMEOUT_S,
            roles=LOCAL_ROLES,
            aliases=(
                "search my memories",
                "search your memory",
                "search your memories",
                "search memory",
                "do you remember",
                "what do you remember",
                "tu te souviens",
                "te souviens-tu",
            ),
        ),
    ]


# ------------------------------------------------------------------------------ explicit requests

# Words for operators, read only to recognise a plain arithmetic question ("what is 3 times 4").
_OPERATOR_WORDS: Final = (
    (re.compile(r"\b(?:to the power of|puissance)\b"), "^"),
    (re.compile(r"\b(?:times|multiplied by|fois)\b"), "*"),
    (re.compile(r"\b(?:divided by|over|divisé par)\b"), "/"),
    (re.compile(r"\b(?:plus)\b"), "+"),
    (re.compile(r"\b(?:minus|moins)\b"), "-"),
    (re.compile(r"\b(?:mod|modulo)\b"), "%"),
)
_QUESTION_PREFIX: Final = re.compile(
    r"^(?:(?:please|hey|ok|so|and)[\s,]+)?"
    r"(?:what(?:'s| is| are)|whats|how much (?:is|are|makes?|does|do)|calculate|compute|evaluate|solve|"
    r"combien (?:font|fait|vaut|donne)|calcule[rz]?|wie ?viel (?:ist|sind|macht)|was ist|cu[aá]nto (?:es|son)|quanto fa)?"
    r"\s*:?\s*"
)
_QUESTION_SUFFIX: Final = re.compile(r"\s*(?:=\s*)?(?:\?+|\.|!)?\s*$")
_ARITHMETIC_BODY: Final = re.compile(r"[\d\s.+\-*/×÷^%()xX]+")
_BINARY_OPERATION: Final = re.compile(r"\d\)*\s*(?:\*\*|[-+*/×÷^%xX])\s*\(*\s*[-+]?\s*\.?\d")
_DATE_LIKE: Final = re.compile(r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}")
_CONVERSION: Final = re.compile(
    r"(?<![\w.])[-+]?\d+(?:\.\d+)?\s*(?P<src>[^\W\d][\w/°]*|°\s*[a-z]+)\s+(?:to|in|into|en)\s+(?P<dst>[^\W\d][\w/°]*|°\s*[a-z]+)"
    r"|\bconvert(?:ir)?\s+[-+]?\d"
)


def asks_arithmetic(text: str) -> bool:
    """Tell whether TEXT is a plain arithmetic question: numbers joined by at least one binary operator (pure)."""
    body = _QUESTION_PREFIX.sub("", text.strip().lower(), count=1)
    body = _QUESTION_SUFFIX.sub("", body, count=1)
    for pattern, symbol in _OPERATOR_WORDS:
        body = pattern.sub(symbol, body)
    if not body or _DATE_LIKE.search(body) or not _ARITHMETIC_BODY.fullmatch(body):
        return False
    return _BINARY_OPERATION.search(body) is not None


def _conversion_at(text: str) -> int | None:
    """Return where TEXT asks to convert a number between two known units ("10 km to miles"), else None (pure)."""
    for match in _CONVERSION.finditer(text):
        src, dst = match.group("src"), match.group("dst")
        if src is None:
            return match.start()  # "convert 12 ..."
        try:
            find_unit(src)
            find_unit(dst)
        except ValueError:
            continue
        return match.start()
    return None


def _alias_pattern(hand: Hand) -> re.Pattern[str]:
    words = {hand.name.lower(), hand.name.lower().replace("_", " "), *(a.lower() for a in hand.aliases)}
    alternatives = sorted((r"\s+".join(re.escape(w) for w in word.split()) for word in words if word.strip()), key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


# ------------------------------------------------------------------------------ registry


class Hands:
    """The hands the persona may use, and the one safe way to run them (loop-only)."""

    def __init__(self, hands: Sequence[Hand] | None = None, *, enabled: Collection[str] | None = None) -> None:
        chosen = list(default_hands() if hands is None else hands)
        names = [h.name for h in chosen]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError("hands with the same name: " + ", ".join(duplicated))
        for hand in chosen:
            if not _NAME_RE.fullmatch(hand.name):
                raise ValueError(f"hand name {hand.name!r} must be 1 to 64 letters, digits, '_' or '-'")
            if not hand.timeout_s > 0:
                raise ValueError(f"hand {hand.name!r}: timeout_s must be positive")
            _check_schema(hand)
        if enabled is not None:
            unknown = sorted(set(enabled) - set(names))
            if unknown:
                raise ValueError(f"unknown hands: {', '.join(unknown)} (known: {', '.join(names)})")
            chosen = [h for h in chosen if h.name in enabled]
        self._hands: dict[str, Hand] = {h.name: h for h in chosen}
        self._aliases: dict[str, re.Pattern[str]] = {h.name: _alias_pattern(h) for h in chosen}
        self._counts: Counter[str] = Counter()

    def names(self) -> tuple[str, ...]:
        return tuple(self._hands)

    def get(self, name: str) -> Hand | None:
        return self._hands.get(name)

    def allowed(self, role: str) -> list[Hand]:
        """Return the hands ROLE may use, in registry order."""
        return [h for h in self._hands.values() if role in h.roles]

    def specs(self, role: str) -> list[dict[str, Any]]:
        """Return the OpenAI-format tool definitions of the hands ROLE may use."""
        return [
            {"type": "function", "function": {"name": h.name, "description": h.description, "parameters": _plain(h.parameters)}}
            for h in self.allowed(role)
        ]

    def requested(self, text: str, role: str) -> str | None:
        """Return the hand TEXT explicitly asks for (an alias, a plain sum, "10 km to miles"), first mentioned first; else None."""
        scan = text[:MAX_REQUEST_SCAN_CHARS].replace("’", "'").lower()
        best: tuple[int, int, str] | None = None
        for order, hand in enumerate(self.allowed(role)):
            match = self._aliases[hand.name].search(scan)
            at: int | None = match.start() if match else None
            if hand.name == CALCULATOR and at is None and asks_arithmetic(scan):
                at = 0
            if hand.name == CONVERT_UNITS:
                found = _conversion_at(scan)
                if found is not None and (at is None or found < at):
                    at = found
            if at is not None and (best is None or (at, order) < best[:2]):
                best = (at, order, hand.name)
        return None if best is None else best[2]

    def _fail(self, name: str, message: str, started: float, counter: str | None = None) -> HandResult:
        self._counts["failures_total"] += 1
        if counter:
            self._counts[counter] += 1
        if name in self._hands:
            self._counts[f"{name}_failures_total"] += 1
        message = _shorten(message, MAX_ERROR_CHARS)
        return HandResult(name, False, encode_content("error", message), {"error": message}, (time.perf_counter() - started) * 1000)

    async def async_run(self, name: str, arguments: Mapping[str, Any], ctx: HandContext) -> HandResult:
        """Run one hand for CTX; every failure (unknown, denied, invalid, slow, broken) comes back as ok=False."""
        started = time.perf_counter()
        self._counts["calls_total"] += 1
        hand = self._hands.get(name)
        shown = _shorten(str(name), MAX_NAME_CHARS)
        if hand is None:
            known = ", ".join(h.name for h in self.allowed(ctx.role)) or "none"
            return self._fail(shown, f"unknown tool '{shown}' (available: {known})", started, "unknown_total")
        self._counts[f"{name}_calls_total"] += 1
        if ctx.role not in hand.roles:
            log.info("hand_denied", hand=name, user=ctx.user, role=ctx.role)
            return self._fail(name, f"tool '{name}' is not permitted for role {ctx.role}", started, "denied_total")
        try:
            args = validate_arguments(hand.parameters, arguments)
        except ValueError as err:
            return self._fail(name, f"invalid arguments: {err}", started, "invalid_total")
        cm = asyncio.timeout(hand.timeout_s)
        try:
            async with cm:
                value = await hand.run(args, ctx)
        except TimeoutError as err:
            if not cm.expired():  # the hand's own TimeoutError, not our deadline
                return self._fail(name, _error_message(err), started)
            log.warning("hand_timed_out", hand=name, user=ctx.user, timeout_s=hand.timeout_s)
            return self._fail(name, f"timed out after {hand.timeout_s:g} s", started, "timeouts_total")
        except (ValueError, ArithmeticError, LookupError, MongarsError) as err:
            # The hand's own refusals (bad input, out of range, disabled part): the model reads why.
            return self._fail(name, _error_message(err), started)
        except Exception as err:
            # A bug in a hand must not take the turn down with it: log it, tell the model it failed.
            log.error("hand_crashed", hand=name, user=ctx.user, error=repr(err), where=_where(err))
            return self._fail(name, f"tool '{name}' failed with an internal error", started, "errors_total")
        try:
            content = encode_content("result", value)
        except (TypeError, ValueError) as err:  # an object, NaN or infinity: a bug in the hand
            log.error("hand_result_not_json", hand=name, error=str(err))
            return self._fail(name, f"tool '{name}' returned a result that is not JSON", started, "errors_total")
        elapsed_ms = (time.perf_counter() - started) * 1000
        log.debug("hand_ran", hand=name, user=ctx.user, ms=round(elapsed_ms, 2))
        return HandResult(name, True, content, value, elapsed_ms)

    def metrics(self) -> dict[str, int]:
        """Return call counters: totals, failures by cause, calls and failures per hand."""
        base = dict.fromkeys(("calls_total", "failures_total", "timeouts_total", "denied_total", "invalid_total", "unknown_total"), 0)
        return {**base, **self._counts}

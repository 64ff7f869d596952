"""Node user state gossiped in ALIVE records: schema, validation and canonical bytes.

The state is a small flat-ish mapping (version, board, models, load, thermal, API address).
Known fields are type- and range-checked; unknown keys are kept so newer nodes can add fields
(append-only, like the message types). The encoded size is capped so an ALIVE record always
fits in one UDP packet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from mongarsd.errors import WireError
from mongarsd.mesh import const

# Known fields and their accepted Python types after msgpack decode.
_STR_FIELDS: Final = frozenset({"version", "board", "api_host", "energy"})
_STR_LIST_FIELDS: Final = frozenset({"models_available", "models_loaded"})
_NONNEG_INT_FIELDS: Final = frozenset({"slots_free", "queue_depth"})
_NUMBER_FIELDS: Final = frozenset({"tokens_per_s", "temperature_c", "joules_per_token"})
_BOOL_FIELDS: Final = frozenset({"throttled"})
_PORT_FIELDS: Final = frozenset({"api_port"})

StateValue = Any  # msgpack-representable value, checked by _check_value


def _check_value(value: object, depth: int, path: str) -> None:
    """Raise WireError unless `value` is a plain msgpack value within depth and length caps."""
    if depth > const.MAX_STATE_DEPTH:
        raise WireError(f"state too deep at {path}")
    if value is None or isinstance(value, bool | int | str | bytes):
        if isinstance(value, str | bytes) and len(value) > const.MAX_STATE_BYTES:
            raise WireError(f"state value too long at {path}")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise WireError(f"state value not finite at {path}")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, depth + 1, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > const.MAX_STR_LEN:
                raise WireError(f"state key invalid at {path}")
            _check_value(item, depth + 1, f"{path}.{key}")
        return
    raise WireError(f"state value of unsupported type at {path}")


def validate_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return a validated copy of a node state mapping or raise WireError."""
    if not isinstance(state, Mapping):
        raise WireError("state is not a mapping")
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or len(key) > const.MAX_STR_LEN:
            raise WireError("state key invalid")
        _check_value(value, 1, key)
        if key in _STR_FIELDS and not isinstance(value, str):
            raise WireError(f"state field {key} must be a string")
        if key in _STR_LIST_FIELDS and not (isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)):
            raise WireError(f"state field {key} must be a list of strings")
        if key in _NONNEG_INT_FIELDS and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise WireError(f"state field {key} must be a non-negative integer")
        if key in _NUMBER_FIELDS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise WireError(f"state field {key} must be a number")
        if key in _BOOL_FIELDS and not isinstance(value, bool):
            raise WireError(f"state field {key} must be a boolean")
        if key in _PORT_FIELDS and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536):
            raise WireError(f"state field {key} must be a port number")
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def encode_state(state: Mapping[str, Any]) -> bytes:
    """Validate and encode a state mapping to the bytes an ALIVE record signs and carries."""
    data: bytes = msgpack.packb(validate_state(state), use_bin_type=True)
    if len(data) > const.MAX_STATE_BYTES:
        raise WireError(f"state encodes to {len(data)} bytes > {const.MAX_STATE_BYTES}")
    return data


def decode_state(data: bytes) -> dict[str, Any]:
    """Decode and validate state bytes from the wire; size is checked before decoding."""
    if len(data) > const.MAX_STATE_BYTES:
        raise WireError("state too large")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=const.MAX_STATE_BYTES,
            max_bin_len=const.MAX_STATE_BYTES,
            max_array_len=const.MAX_STATE_BYTES,
            max_map_len=const.MAX_STATE_BYTES,
            max_ext_len=0,
        )
    except (ValueError, TypeError) as err:  # msgpack raises ValueError subclasses
        raise WireError("state not decodable") from err
    if not isinstance(value, dict):
        raise WireError("state is not a map")
    return validate_state(value)

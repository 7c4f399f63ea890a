"""Keep tokens and credentials out of MLflow params, tags, console lines and saved configs.

Masked, by shapes tested in tests/test_security.py:
- values of keys named like a secret, in any naming style (HF_TOKEN, hf-token, hfToken,
  MLFLOW_TRACKING_PASSWORD, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY, GITHUB_PAT, ...), also
  inside `key=value` overrides;
- the whole user part of a URL (`https://user:pa/ss@word@host`, `https://TOKEN@host`);
- query parameters named like a secret (`?token=...`, `?api_key=...`, `?sig=...`);
- any occurrence of the value of an environment variable named like a secret.
Never masked: numbers (a metric such as `token_f1` stays a number), and names that only
contain a secret word (`max_new_tokens`, `tokenizer`, `token_f1`, `author`).
Written by hand: the libraries that mask secrets scan source code, not run records.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# Secret words as whole name components; `token` and `auth` only as the last component
# (HF_TOKEN, access_token; not token_f1 or auth_type).
_ANYWHERE = (
    r"secret|passw(?:or)?d|api[_-]?key|apikey|access[_-]?key|private[_-]?key|credentials?"
    r"|connection[_-]?string|pat|sig|signature"
)
_LAST = r"token|auth"
SECRET_NAME = re.compile(
    rf"(?:^|[_.\-/])(?:(?:{_ANYWHERE})(?:$|[_.\-])|(?:{_LAST})$)", re.IGNORECASE
)
URL_USERINFO = re.compile(
    r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^\s/:@'\"]+(?::[^\s'\"]*)?)@(?=[^\s@/'\"])",
    re.IGNORECASE,
)
QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<key>[^=&#\s'\"]+)=(?P<value>[^&#\s'\"]*)")
OVERRIDE = re.compile(r"^(?P<key>[+~]*[\w.\-/]+)=(?P<value>.*)$", re.DOTALL)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def is_secret_name(name: str) -> bool:
    """Whether a key or variable name says it holds a secret (camelCase split into words)."""
    return bool(SECRET_NAME.search(_CAMEL.sub("_", str(name))))


def secret_env_values() -> list[str]:
    """Values of environment variables named like secrets, longest first (at least 4 characters)."""
    values = {
        value for name, value in os.environ.items() if is_secret_name(name) and len(value) >= 4
    }
    return sorted(values, key=len, reverse=True)


def _mask_query(match: re.Match) -> str:
    if is_secret_name(match["key"]) and match["value"]:
        return f"{match['lead']}{match['key']}={MASK}"
    return match[0]


def redact_value(value: Any, secrets: list[str] | None = None) -> Any:
    """A string with every secret shape masked; anything else unchanged."""
    if not isinstance(value, str):
        return value
    override = OVERRIDE.match(value)
    if override and is_secret_name(override["key"].lstrip("+~")) and override["value"]:
        return f"{override['key']}={MASK}"
    value = URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", value)
    if "=" in value:
        value = QUERY_PARAM.sub(_mask_query, value)
    for secret in secrets if secrets is not None else secret_env_values():
        value = value.replace(secret, MASK)
    return value


def redact(mapping: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (nested) mapping with secrets masked; numbers are never masked."""
    secrets = secret_env_values()
    clean: dict[str, Any] = {}
    for key, value in mapping.items():
        last = str(key).rsplit(".", 1)[-1]
        if is_secret_name(last) and isinstance(value, str) and value:
            clean[key] = MASK
        elif isinstance(value, dict):
            clean[key] = redact(value)
        elif isinstance(value, list):
            clean[key] = [
                redact(v) if isinstance(v, dict) else redact_value(v, secrets) for v in value
            ]
        else:
            clean[key] = redact_value(value, secrets)
    return clean

"""Keep tokens and credentials out of MLflow params, tags and saved configs.

Redacted: values of keys named like a secret (token, secret, password, api key,
credential), the password in a URI (`http://user:pass@host`), and any occurrence of
the value of an environment variable named like a secret (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, ...).
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# A name component (between _ . -) that says "secret": HF_TOKEN, api_key, AWS_SECRET_ACCESS_KEY;
# not max_new_tokens or tokenizer.
SECRET_NAME = re.compile(
    r"(^|[_.-])(token|secret|passw(or)?d|api[_-]?key|apikey|credentials?|private[_-]?key|auth)($|[_.-])",
    re.IGNORECASE,
)
URI_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@/\s]+)@", re.IGNORECASE
)


def secret_env_values() -> list[str]:
    """Values of environment variables named like secrets, longest first (at least 4 characters)."""
    values = {
        value for name, value in os.environ.items() if SECRET_NAME.search(name) and len(value) >= 4
    }
    return sorted(values, key=len, reverse=True)


def redact_value(value: Any, secrets: list[str] | None = None) -> Any:
    if not isinstance(value, str):
        return value
    value = URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", value)
    for secret in secrets if secrets is not None else secret_env_values():
        value = value.replace(secret, MASK)
    return value


def redact(mapping: dict[str, Any]) -> dict[str, Any]:
    """A copy of a (nested) mapping with secrets masked."""
    secrets = secret_env_values()
    clean: dict[str, Any] = {}
    for key, value in mapping.items():
        last = str(key).rsplit(".", 1)[-1]
        if SECRET_NAME.search(last) and value not in (None, ""):
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

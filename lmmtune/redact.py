"""Keep tokens and credentials out of MLflow params, tags, console lines and saved configs.

Masked, by shapes tested in tests/test_security.py:
- values of keys named like a secret, in any naming style (HF_TOKEN, hf-token, hfToken,
  MLFLOW_TRACKING_PASSWORD, PGPASSWORD, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY, GITHUB_PAT,
  SLACK_WEBHOOK_URL, and any *_KEY, *_PASS* (PASS, PASSWORD, PASSWD, PASSPHRASE, ...) or
  *_PWD), also inside `key=value` overrides and `key=value` words of a log line;
- the whole user part of a URL (`https://user:pa/ss@word@host`, `https://TOKEN@host`),
  also as Hydra escapes it in its launcher lines (`http\\://user\\:pw@host`);
- query parameters named like a secret (`?token=...`, `?api_key=...`, `?sig=...`);
- any occurrence of the value of an environment variable named like a secret (so a
  `${oc.env:PGPASSWORD}` in a config is masked wherever it lands).
Never masked: numbers (a metric such as `token_f1` stays a number), and names that only
contain a secret word (`max_new_tokens`, `tokenizer`, `token_f1`, `author`, `PWD`).
Log lines: `RedactingFilter` masks every line a handler of lmmtune's prints, the
libraries' (Hydra's launcher, MLflow's) included.
Written by hand: the libraries that mask secrets scan source code, not run records.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
# Secret words as whole name components (PGPASSWORD: a password word may end a longer
# one); `token` and `auth` only as the last component (HF_TOKEN, access_token; not
# token_f1 or auth_type); `key`, `pwd` and the pass words only after another component
# (OPENAI_KEY, MYSQL_PWD, DB_PASS; not PWD, the shell's working directory, or keep_best).
_ANYWHERE = (
    r"secret|[a-z0-9]*passw(?:or)?d|passphrase|webhooks?|api[_-]?key|apikey|access[_-]?key"
    r"|private[_-]?key|credentials?|connection[_-]?string|pat|sig|signature"
)
_LAST = r"token|auth"
_AFTER_ANOTHER = r"key$|pwd$|pass(?:word|wd|phrase|code|key)?(?:$|[_.\-])"
SECRET_NAME = re.compile(
    rf"(?:^|[_.\-/])(?:(?:{_ANYWHERE})(?:$|[_.\-])|(?:{_LAST})$)|[_.\-/](?:{_AFTER_ANOTHER})",
    re.IGNORECASE,
)
URL_USERINFO = re.compile(  # `\\://`: Hydra's launcher lines escape the colons
    r"(?P<scheme>\b[a-z][a-z0-9+.-]*\\?://)(?P<userinfo>[^\s/:@'\"]+(?::[^\s'\"]*)?)@(?=[^\s@/'\"])",
    re.IGNORECASE,
)
QUERY_PARAM = re.compile(
    r"(?P<lead>[?&;])(?P<key>[^=&#\s'\"\\]+)(?P<equals>\\?=)(?P<value>[^&#\s'\"]*)"
)
OVERRIDE = re.compile(r"^(?P<key>[+~]*[\w.\-/]+)=(?P<value>.*)$", re.DOTALL)
KEY_VALUE_WORD = re.compile(r"(?P<lead>^|\s)(?P<key>[+~]*[\w.\-/]+)(?P<equals>\\?=)(?P<value>\S+)")
"""A `key=value` word inside a longer text (a Hydra launcher line lists the overrides)."""
HYDRA_ESCAPED = re.compile(r"([\\()\[\]{}:=, \t])")
"""Characters Hydra escapes with a backslash when it prints an override."""
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


def _mask_named(match: re.Match) -> str:
    """A `key=value` (query parameter or word) with the value masked if the key is a secret's."""
    if is_secret_name(match["key"].lstrip("+~")) and match["value"]:
        return f"{match['lead']}{match['key']}{match['equals']}{MASK}"
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
        value = KEY_VALUE_WORD.sub(_mask_named, QUERY_PARAM.sub(_mask_named, value))
    for secret in secrets if secrets is not None else secret_env_values():
        value = value.replace(secret, MASK).replace(HYDRA_ESCAPED.sub(r"\\\1", secret), MASK)
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in every log line a handler prints, the libraries' lines included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact_value(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


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

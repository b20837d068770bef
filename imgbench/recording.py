"""Recording and replay of provider traffic with vcrpy cassettes.

One shared configuration serves every provider, and ``RecordingRules``
contains the few provider-specific parts. A case's traffic goes to
``cassettes/<provider>/<case id>.yaml``, with a sidecar
``<case id>.meta.json`` that records what the cassette was recorded against,
when, with which versions, and which predictions the recorded run made.

What a cassette stores:

* Requests keep only their ``Content-Type`` header, so ``Authorization`` and
  every other credential header never reach disk. Secret form fields, JSON
  fields and query parameters become ``REDACTED``, and values a provider
  names (client ids, account ids, bucket names) become placeholders.
* An image body is replaced by ``sha256:<hex digest>`` of the image bytes: a
  whole binary body, or a ``data:...;base64,`` string inside a JSON body, or
  a JSON field that ``RecordingRules.base64_fields`` names. A
  ``multipart/related`` body is stored as JSON of its scrubbed parts, without
  its random boundary.
  Requests are matched on method, path, query and a digest of that scrubbed
  body, never on scheme, host or port, so a cassette recorded against the
  emulator on a random port replays anywhere.
* Responses keep only ``Content-Type`` and ``Retry-After``, and tokens in
  JSON bodies (``access_token`` and the like) become ``REDACTED``.
* A request that always got the same response is stored once, and a
  replayed request that matches only interactions already played gets the
  last of them again. The load test sends each test image many times, so a
  cassette contains one invoke per distinct test image. Requests answered
  differently over time (status polls, retried 429s) keep their sequence.

Replay is strict: a request with no recorded match raises
``CassetteMissError``, naming the case, the request and the closest recorded
requests. ``block_network`` refuses non-loopback connections while a case
replays.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import platform
import re
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import vcr
from vcr.cassette import Cassette
from vcr.errors import CannotOverwriteExistingCassetteException, UnhandledHTTPRequestError
from vcr.persisters.filesystem import FilesystemPersister
from vcr.record_mode import RecordMode

import imgbench
from imgbench.errors import ConfigError, ImgbenchError

logger = logging.getLogger(__name__)

# Record modes, spelled as pytest-recording spells them. "none" replays only.
RECORD_MODES = ("none", "once", "new_episodes", "all")
DEFAULT_RECORD_MODE = "none"

# Services a cassette can be recorded against.
RECORDED_AGAINST = ("emulator", "live")

REDACTED = "REDACTED"
DIGEST_PREFIX = "sha256:"

KEPT_REQUEST_HEADERS = frozenset({"content-type"})
KEPT_RESPONSE_HEADERS = frozenset({"content-type", "retry-after"})

SECRET_FIELDS = frozenset({
    "client_id", "client_secret", "access_token", "refresh_token", "id_token", "password",
    "api_key", "apikey", "secret", "private_key", "assertion", "token",
})

# Checksum fields in the metadata part of a multipart upload, and what they become.
MULTIPART_CHECKSUM_FIELDS = frozenset({"crc32c", "md5Hash"})
MULTIPART_CHECKSUM = "checksum-of-the-next-part"

META_FORMAT_VERSION = 1
VERSIONED_PACKAGES = ("vcrpy", "requests", "urllib3", "pillow", "httpx", "huggingface_hub", "boto3", "botocore",
                      "google-cloud-aiplatform", "google-cloud-storage", "google-api-core")


class CassetteMissError(ImgbenchError):
    """A replayed request has no recorded response left in the case's cassette."""

    kind = "cassette_miss"


class NetworkBlockedError(ImgbenchError):
    """A connection to a non-loopback address was attempted while the network is blocked."""

    kind = "network_blocked"


@dataclass(frozen=True)
class RecordingRules:
    """The provider-specific part of the cassette configuration.

    ``base_url`` replaces scheme, host and port of every stored URI, so
    recordings against an emulator on a random port compare line by line.
    ``sensitive_values`` maps placeholders to values that must never reach
    disk, such as client ids, account ids, bucket names and run prefixes. A
    replay puts the current value back where it is known.
    """

    provider: str
    base_url: str
    match_on: tuple[str, ...] = ("method", "path", "query", "body_digest")
    secret_fields: frozenset[str] = SECRET_FIELDS
    # A value may also be a callable of (request, response) that vcrpy calls
    # when it hides or restores the value, for values learnt during the case.
    sensitive_values: Mapping[str, str | None | Callable] = field(default_factory=dict)
    # Request headers stored and matched besides Content-Type, such as
    # X-Amz-Target, which names the operation of an AWS JSON request.
    kept_request_headers: frozenset[str] = KEPT_REQUEST_HEADERS
    # JSON fields whose string values are base64 data (such as an image's
    # bytes) and are stored as ``sha256:<hex>`` of the decoded bytes.
    base64_fields: frozenset[str] = frozenset()
    # JSON fields whose string values (such as base64 file contents of a Hub
    # commit) are stored as ``sha256:<hex>`` of the string itself.
    digest_fields: frozenset[str] = frozenset()
    # (regular expression, replacement) pairs applied to stored URIs and
    # bodies, for values of a known shape such as service-account emails.
    text_patterns: tuple[tuple[str, str], ...] = ()
    # Functions by request path (as stored, such as "/api/whoami-v2") that
    # rewrite that path's JSON response body before it is saved: they get the
    # parsed body and return the body to store. They suit responses where
    # only a known list of fields may reach disk, such as an account profile.
    response_filters: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)


def validate_record_mode(value: str) -> str:
    if value not in RECORD_MODES:
        raise ConfigError(f"invalid record mode {value!r} in --record-mode; valid modes: {', '.join(RECORD_MODES)}")
    return value


def cassette_path(cassette_dir: Path, provider: str, case_id: str) -> Path:
    return cassette_dir / provider / f"{case_id}.yaml"


def meta_path(cassette_file: Path) -> Path:
    return cassette_file.with_name(cassette_file.name.removesuffix(".yaml") + ".meta.json")


# Scrubbing ------------------------------------------------------------------

def digest_text(data: bytes) -> str:
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def _digest_data_uri(value: str) -> str:
    """Return ``sha256:<hex>`` of a base64 data URI's bytes, or ``value`` unchanged."""
    if not value.startswith("data:"):
        return value
    header, separator, payload = value.partition(",")
    if not separator or not header.endswith(";base64"):
        return value
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return value
    return digest_text(data)


def _digest_base64(value):
    """Return ``sha256:<hex>`` of a base64 string's decoded bytes, or ``value`` unchanged."""
    if not isinstance(value, str) or value.startswith(DIGEST_PREFIX):
        return value
    try:
        return digest_text(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return value


def scrub_json(value, secret_fields: frozenset[str], base64_fields: frozenset[str] = frozenset(),
               digest_fields: frozenset[str] = frozenset()):
    """Return a copy of a JSON value with secret fields redacted and data URIs and named fields digested."""
    if isinstance(value, dict):
        scrubbed = {}
        for key, item in value.items():
            if key.lower() in secret_fields and item not in (None, ""):
                scrubbed[key] = REDACTED
            elif key in base64_fields:
                scrubbed[key] = _digest_base64(item)
            elif key in digest_fields and isinstance(item, str) and not item.startswith(DIGEST_PREFIX):
                scrubbed[key] = digest_text(item.encode("utf-8"))
            else:
                scrubbed[key] = scrub_json(item, secret_fields, base64_fields, digest_fields)
        return scrubbed
    if isinstance(value, list):
        return [scrub_json(item, secret_fields, base64_fields, digest_fields) for item in value]
    if isinstance(value, str):
        return _digest_data_uri(value)
    return value


def _scrub_ndjson(text: str, secret_fields: frozenset[str], base64_fields: frozenset[str],
                  digest_fields: frozenset[str]) -> bytes:
    """Scrub each line of a newline-delimited JSON body (the Hub's commit API sends one)."""
    lines = []
    for line in text.splitlines():
        try:
            lines.append(_canonical_json(scrub_json(json.loads(line), secret_fields, base64_fields, digest_fields)))
        except ValueError:
            lines.append(line.encode("utf-8"))
    return b"\n".join(lines) + b"\n"


def _canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _scrub_form(body: bytes, secret_fields: frozenset[str]) -> bytes:
    pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    scrubbed = [(key, REDACTED if key.lower() in secret_fields else value) for key, value in pairs]
    return urlencode(sorted(scrubbed)).encode("utf-8")


def _header(headers: Mapping, name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            if isinstance(value, (list, tuple)):
                value = value[0] if value else ""
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return ""


def _scrub_multipart(data: bytes, content_type: str, secret_fields: frozenset[str],
                     base64_fields: frozenset[str], digest_fields: frozenset[str]) -> bytes | None:
    """Return a ``multipart/related`` body as canonical JSON of its scrubbed parts, or None when it has none.

    The boundary is random per request (google-cloud-storage uploads), so it
    is left out, and each part is scrubbed by its own content type. Checksums
    in a JSON part (``crc32c``, ``md5Hash``) describe the next part, which is
    stored itself, so they become ``MULTIPART_CHECKSUM``: a text part that
    contains run-specific values would otherwise never match on replay.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return None
    separator = b"--" + match.group(1).encode("latin-1")
    parts = []
    for chunk in data.split(separator)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, part = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        part_type = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.strip()
        scrubbed = scrub_body(part.removesuffix(b"\r\n"), part_type, secret_fields, base64_fields, digest_fields)
        if part_type.split(";")[0].strip().lower().endswith("json"):
            try:
                fields = json.loads(scrubbed)
            except ValueError:
                fields = None
            if isinstance(fields, dict):
                for key in MULTIPART_CHECKSUM_FIELDS & set(fields):
                    fields[key] = MULTIPART_CHECKSUM
                scrubbed = _canonical_json(fields)
        try:
            text = scrubbed.decode("utf-8")
        except UnicodeDecodeError:
            text = digest_text(scrubbed)
        parts.append({"content_type": part_type, "body": text})
    if not parts:
        return None
    return _canonical_json({"multipart": parts})


def scrub_body(body: bytes | str | None, content_type: str, secret_fields: frozenset[str],
               base64_fields: frozenset[str] = frozenset(), digest_fields: frozenset[str] = frozenset()) -> bytes | None:
    """Return a body as stored in a cassette: images digested, secrets redacted, JSON canonical."""
    if body is None or body == b"" or body == "":
        return body if body is None else b""
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    if data.startswith(DIGEST_PREFIX.encode()) and len(data) == len(DIGEST_PREFIX) + 64:
        return data  # scrubbed before
    media_type = content_type.split(";")[0].strip().lower()
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        return digest_text(data).encode()
    if media_type == "multipart/related":
        multipart = _scrub_multipart(data, content_type, secret_fields, base64_fields, digest_fields)
        if multipart is not None:
            return multipart
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return digest_text(data).encode()
    if media_type == "application/x-www-form-urlencoded":
        return _scrub_form(data, secret_fields)
    if media_type in ("application/x-ndjson", "application/jsonl"):
        return _scrub_ndjson(text, secret_fields, base64_fields, digest_fields)
    if media_type.endswith("json") or text[:1] in ("{", "["):
        try:
            return _canonical_json(scrub_json(json.loads(text), secret_fields, base64_fields, digest_fields))
        except ValueError:
            return data
    return data


def _apply_patterns(value, patterns: tuple[tuple[str, str], ...]):
    """Return ``value`` (text or bytes) with each regex of ``patterns`` replaced."""
    if not patterns or value is None:
        return value
    is_bytes = isinstance(value, bytes)
    try:
        text = value.decode("utf-8") if is_bytes else value
    except UnicodeDecodeError:
        return value
    for pattern, replacement in patterns:
        text = re.sub(pattern, replacement, text)
    return text.encode("utf-8") if is_bytes else text


def _scrub_uri(uri: str, base_url: str, secret_fields: frozenset[str]) -> str:
    parts = urlsplit(uri)
    base = urlsplit(base_url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(key, REDACTED if key.lower() in secret_fields else value) for key, value in pairs])
    return urlunsplit((base.scheme, base.netloc, parts.path, query, ""))


def request_scrubber(rules: RecordingRules) -> Callable:
    """Build vcrpy's ``before_record_request`` hook for ``rules``.

    vcrpy runs it on a copy of each request both before storing it and before
    matching it, so stored and incoming requests compare in the same form.
    """

    def scrub(request):
        content_type = _header(request.headers, "content-type")
        request.uri = _apply_patterns(_scrub_uri(request.uri, rules.base_url, rules.secret_fields),
                                      rules.text_patterns)
        request.body = _apply_patterns(scrub_body(_request_body(request), content_type, rules.secret_fields,
                                                  rules.base64_fields, rules.digest_fields), rules.text_patterns)
        request.headers = {key: value.decode("latin-1") if isinstance(value, bytes) else value
                           for key, value in request.headers.items() if key.lower() in rules.kept_request_headers}
        if not isinstance(request.body, (bytes, str, type(None))):
            # A file-like or iterator body (botocore's S3 uploads) would be stored as a
            # pickled stream; a new request built from the bytes stores them plainly.
            request = type(request)(request.method, request.uri, _request_body(request), request.headers)
        return request

    return scrub


def response_scrubber(rules: RecordingRules) -> Callable:
    """Build vcrpy's ``before_record_response`` hook for ``rules``."""

    def scrub(response: dict) -> dict:
        headers = {key: value for key, value in response["headers"].items()
                   if key.lower() in KEPT_RESPONSE_HEADERS}
        body = response["body"]["string"]
        content_type = _header(headers, "content-type")
        if content_type.split(";")[0].strip().lower().endswith("json") and body:
            try:
                body = _canonical_json(scrub_json(json.loads(body), rules.secret_fields, rules.base64_fields,
                                                  rules.digest_fields))
            except ValueError:
                pass
        response["headers"] = headers
        body = _apply_patterns(body, rules.text_patterns)
        response["body"] = {"string": body}
        return response

    return scrub


def response_filter_hook(rules: RecordingRules) -> Callable:
    """Build vcrpy's ``before_save_interaction`` hook that applies ``rules.response_filters``.

    vcrpy runs it on a copy of each interaction as the cassette is saved,
    before ``filter_sensitive_data`` hides values, so a filter sees the values
    as recorded. A body that is not JSON is stored as it is.
    """

    def apply(request, response):
        response_filter = rules.response_filters.get(urlsplit(request.uri).path)
        body = response["body"]["string"]
        if response_filter is None or not body:
            return request, response
        try:
            parsed = json.loads(body)
        except ValueError:
            return request, response
        response["body"] = {"string": _canonical_json(response_filter(parsed))}
        return request, response

    return apply


# Matching -------------------------------------------------------------------

def _request_body(request):
    """Return a vcrpy request's body as stored: bytes, str or None.

    vcrpy hands a file-like body (as botocore sends for S3 uploads) back as a
    new ``BytesIO`` and an iterator body as an iterator; ``body_bytes`` has
    the bytes of either.
    """
    return getattr(request, "body_bytes", request.body)


def body_digest(request) -> str:
    body = _request_body(request)
    if body is None:
        return "none"
    if isinstance(body, str):
        body = body.encode("utf-8")
    return hashlib.sha256(bytes(body)).hexdigest()


def match_body_digest(r1, r2) -> None:
    """vcrpy matcher: the scrubbed bodies are byte-for-byte equal."""
    first, second = body_digest(r1), body_digest(r2)
    if first != second:
        raise AssertionError(f"body digest {first[:12]} != recorded {second[:12]}")


def match_amz_target(r1, r2) -> None:
    """vcrpy matcher: both requests name the same AWS operation in X-Amz-Target (or neither names one)."""
    first, second = _header(r1.headers, "x-amz-target"), _header(r2.headers, "x-amz-target")
    if first != second:
        raise AssertionError(f"X-Amz-Target {first or '(none)'} != recorded {second or '(none)'}")


def _matches(request, stored, matchers) -> bool:
    for matcher in matchers:
        try:
            if matcher(request, stored) is False:
                return False
        except AssertionError:
            return False
    return True


class ReplayCassette(Cassette):
    """A cassette that is safe to share between threads and replays repeats.

    vcrpy's ``Cassette`` takes no lock, and with ``allow_playback_repeats`` it
    always plays the first match, so every poll of a training wait would get
    the first recorded "still training" state. Here a request plays the first
    matching interaction not yet played, then keeps playing the last matching
    one. A cassette that is still being recorded never plays anything back.
    """

    case_id: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.RLock()
        self._selected = threading.local()

    def _select(self, request) -> int | None:
        filtered = self._before_record_request(request)
        if not filtered:
            return None
        matching = [index for index, (stored, _) in enumerate(self.data)
                    if stored.method == filtered.method and _matches(filtered, stored, self._match_on)]
        for index in matching:
            if self.play_counts[index] == 0:
                return index
        if matching and self.allow_playback_repeats:
            return matching[-1]
        return None

    def can_play_response_for(self, request) -> bool:
        if self.record_mode == RecordMode.ALL or not self.rewound:
            return False
        with self._lock:
            index = self._select(request)
        # vcrpy calls play_response with the same request next, in the same thread.
        self._selected.last = (request, index)
        return index is not None

    def play_response(self, request):
        with self._lock:
            last_request, index = getattr(self._selected, "last", (None, None))
            self._selected.last = (None, None)
            if (last_request is not request or index is None
                    or (self.play_counts[index] and not self.allow_playback_repeats)):
                index = self._select(request)
            if index is None:
                raise UnhandledHTTPRequestError(
                    f"the cassette {self._path!r} has no unplayed response for {request!r}")
            if self.play_counts[index] == 0 and index < self._loaded_count:
                self._played_interactions.append(self.data[index])
            self.play_counts[index] += 1
            return self.data[index][1]

    def __contains__(self, request) -> bool:
        with self._lock:
            return self._select(request) is not None

    def append(self, request, response) -> None:
        with self._lock:
            super().append(request, response)


class DedupingPersister(FilesystemPersister):
    """Saves a cassette with repeated identical interactions stored once, atomically."""

    @staticmethod
    def save_cassette(cassette_path, cassette_dict, serializer):
        requests, responses = deduplicate(cassette_dict["requests"], cassette_dict["responses"])
        deduplicated = {**cassette_dict, "requests": requests, "responses": responses}
        from vcr.serialize import serialize

        text = serialize(deduplicated, serializer)
        path = Path(cassette_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.chmod(temporary, 0o644)  # mkstemp creates the file readable by its owner only
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        logger.info("cassette %s saved: %d interactions (%d before removing repeats)",
                    path, len(requests), len(cassette_dict["requests"]))


def _request_key(request) -> str:
    parts = urlsplit(request.uri)
    key = [request.method, parts.path, parts.query, body_digest(request)]
    target = _header(request.headers, "x-amz-target")
    if target:
        # AWS JSON operations share one path and can share a body, such as Stop- and DeleteProjectVersion.
        key.append(target)
    return json.dumps(key)


def _response_key(response) -> str:
    body = response["body"]["string"]
    if isinstance(body, str):
        body = body.encode("utf-8")
    return json.dumps([response["status"]["code"], hashlib.sha256(body or b"").hexdigest(),
                       sorted(response["headers"].items())], default=str)


def deduplicate(requests: list, responses: list) -> tuple[list, list]:
    """Store a request that always got the same response once; keep every other interaction.

    A request that got different responses over time (a status poll, a
    retried 429) keeps its whole sequence, so a replay walks through the same
    states.
    """
    answers: dict[str, set[str]] = {}
    for request, response in zip(requests, responses, strict=True):
        answers.setdefault(_request_key(request), set()).add(_response_key(response))
    seen: set[str] = set()
    kept_requests, kept_responses = [], []
    for request, response in zip(requests, responses, strict=True):
        key = _request_key(request)
        if len(answers[key]) == 1:
            if key in seen:
                continue
            seen.add(key)
        kept_requests.append(request)
        kept_responses.append(response)
    return kept_requests, kept_responses


# Cassettes of a case --------------------------------------------------------

def build_vcr(rules: RecordingRules, record_mode: str) -> vcr.VCR:
    """Return the shared vcrpy configuration for one provider."""
    recorder = vcr.VCR(
        record_mode=validate_record_mode(record_mode),
        match_on=rules.match_on,
        before_record_request=request_scrubber(rules),
        before_record_response=response_scrubber(rules),
        decode_compressed_response=True,
        filter_sensitive_data=[(placeholder, value) for placeholder, value in rules.sensitive_values.items()],
        before_save_interaction=response_filter_hook(rules) if rules.response_filters else None,
    )
    recorder.register_matcher("body_digest", match_body_digest)
    recorder.register_matcher("amz_target", match_amz_target)
    recorder.register_persister(DedupingPersister)
    return recorder


_patching_lock = threading.RLock()
_patching_made_thread_safe = False


def make_vcr_patching_thread_safe() -> None:
    """Stop other threads from getting an unpatched connection while vcrpy resets its patches.

    vcrpy's ``force_reset`` puts urllib3's real connection classes back for a
    moment whenever it builds a connection or sends a recorded request. A
    connection pool that creates a connection in another thread during that
    moment gets a real one, which bypasses the cassette (seen with vcrpy 9.4). Here both
    the reset and urllib3's connection creation take one lock. Installed once
    per process; it changes nothing else.
    """
    global _patching_made_thread_safe
    with _patching_lock:
        if _patching_made_thread_safe:
            return
        from urllib3 import connectionpool
        import vcr.patch

        for pool_class in (connectionpool.HTTPConnectionPool, connectionpool.HTTPSConnectionPool):
            pool_class._new_conn = _locked(pool_class.__dict__["_new_conn"])
        original_reset = vcr.patch.force_reset

        @contextlib.contextmanager
        def locked_force_reset():
            with _patching_lock, original_reset():
                yield

        vcr.patch.force_reset = locked_force_reset
        _patching_made_thread_safe = True


def _locked(method: Callable) -> Callable:
    def locked(*args, **kwargs):
        with _patching_lock:
            return method(*args, **kwargs)

    locked.__wrapped__ = method
    return locked


@contextlib.contextmanager
def use_case_cassette(rules: RecordingRules, path: Path, record_mode: str, case_id: str) -> Iterator[ReplayCassette]:
    """Record or replay one case's traffic through the cassette at ``path``."""
    make_vcr_patching_thread_safe()
    recorder = build_vcr(rules, record_mode)
    config = recorder.get_merged_config(path=str(path), allow_playback_repeats=True)
    with ReplayCassette.use(**config) as cassette:
        cassette.case_id = case_id
        logger.info("case %s: cassette %s (record mode %s, %d recorded interactions)",
                    case_id, path, record_mode, len(cassette))
        yield cassette


def cassette_miss_error(exc: CannotOverwriteExistingCassetteException) -> CassetteMissError:
    """Explain a request that the cassette has no response for, with the closest recorded requests."""
    cassette = exc.cassette
    case_id = getattr(cassette, "case_id", "") or Path(cassette._path).stem
    request = exc.failed_request
    reason = getattr(exc, "reason", "no_match")
    similar = getattr(exc, "similar_requests", None) or cassette.find_requests_with_most_matches(request)
    lines = [f"case {case_id}: the cassette {cassette._path} has no recorded response for "
             f"{_describe_request(request)} ({_MISS_REASONS.get(reason, reason)})."]
    if similar:
        lines.append("Closest recorded requests:")
        for stored, _, failed in similar[:3]:
            differences = "; ".join(f"{name}: {message}" for name, message in failed) or "matches"
            lines.append(f"  {_describe_request(stored)} (differs in {differences})")
    provider = Path(cassette._path).parent.name
    lines.append(f"Re-record it with --record-mode=once against the emulator (--{provider}-url URL) "
                 "or the live service (-m live); see cassettes/README.md.")
    return CassetteMissError("\n".join(lines))


_MISS_REASONS = {
    "cassette_not_found": "the cassette is empty or missing",
    "already_played": "every matching interaction was played already",
    "no_match": "no recorded request matches",
    "nothing_similar": "no recorded request is similar",
}


def _describe_request(request) -> str:
    parts = urlsplit(request.uri)
    query = f"?{parts.query}" if parts.query else ""
    target = _header(request.headers, "x-amz-target")
    return f"{request.method} {parts.path}{query}" + (f" ({target})" if target else "")


# Sidecar metadata ------------------------------------------------------------

def library_versions() -> dict[str, str]:
    versions = {"imgbench": imgbench.__version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_meta(path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_meta(path: Path) -> dict | None:
    """Return a cassette's sidecar metadata, or None when there is none."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"the cassette metadata {path} is not valid JSON ({exc}); re-record the cassette") from exc


def new_meta(*, provider: str, case_id: str, recorded_against: str, record_mode: str, record: dict) -> dict:
    """Describe a recording: where, when, with what, and the predictions it made."""
    if recorded_against not in RECORDED_AGAINST:
        raise ValueError(f"recorded_against must be one of {RECORDED_AGAINST}, not {recorded_against!r}")
    return {
        "format_version": META_FORMAT_VERSION,
        "provider": provider,
        "case_id": case_id,
        "recorded_against": recorded_against,
        "recorded_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "record_mode": record_mode,
        "versions": library_versions(),
        "dataset": record.get("dataset"),
        "ablation": record.get("ablation"),
        "manifest_sha256": record.get("manifest_sha256"),
        "load_requests": (record.get("load_test") or {}).get("requests"),
        "predictions": [{"sha256": row["sha256"], "predicted": row["predicted"]}
                        for row in record.get("predictions", [])],
    }


# Network guard ----------------------------------------------------------------

def is_loopback(host) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


_network_lock = threading.Lock()
_network_depth = 0
_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex
_original_getaddrinfo = socket.getaddrinfo


def _check_host(host) -> None:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host is not None and not is_loopback(host):
        raise NetworkBlockedError(
            f"connection to {host} blocked: this case may only connect to loopback addresses; "
            "a replay that needs the network is missing a recorded interaction"
        )


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check_host(address[0])
    return _original_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check_host(address[0])
    return _original_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    _check_host(host)  # no DNS query leaves the machine either
    return _original_getaddrinfo(host, *args, **kwargs)


@contextlib.contextmanager
def block_network() -> Iterator[None]:
    """Refuse name lookups and connections for non-loopback hosts in this process, in every thread."""
    global _network_depth
    with _network_lock:
        if _network_depth == 0:
            socket.socket.connect = _guarded_connect
            socket.socket.connect_ex = _guarded_connect_ex
            socket.getaddrinfo = _guarded_getaddrinfo
        _network_depth += 1
    try:
        yield
    finally:
        with _network_lock:
            _network_depth -= 1
            if _network_depth == 0:
                socket.socket.connect = _original_connect
                socket.socket.connect_ex = _original_connect_ex
                socket.getaddrinfo = _original_getaddrinfo


# Secret scanning ----------------------------------------------------------------

SECRET_PATTERNS: dict[str, re.Pattern] = {
    "bearer token": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]{8,}=*"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
# A secret field followed by a value other than REDACTED or a <PLACEHOLDER>.
SECRET_FIELD_PATTERN = re.compile(
    r"""(?i)\b(client_secret|access_token|refresh_token|id_token)["'\\]*\s*[:=]\s*["'\\]*"""
    r"""(?!REDACTED\b|<[A-Z_]+>)([A-Za-z0-9\-._~+/]{4,})"""
)


def scan_for_secrets(text: str, known_values: tuple[str, ...] = ()) -> list[str]:
    """Return a description of every likely secret in ``text`` (empty when clean).

    Looks for bearer tokens, AWS access key ids, private key headers,
    ``client_secret``, ``access_token`` and similar fields with a value, and
    any of ``known_values`` (the credentials of the run).
    """
    findings = []
    for name, pattern in SECRET_PATTERNS.items():
        for match in pattern.finditer(text):
            findings.append(f"{name} at offset {match.start()}")
    for match in SECRET_FIELD_PATTERN.finditer(text):
        findings.append(f"{match.group(1)} with a value at offset {match.start()}")
    for value in known_values:
        if value and value in text:
            findings.append(f"a credential value ({len(value)} characters) at offset {text.index(value)}")
    return findings

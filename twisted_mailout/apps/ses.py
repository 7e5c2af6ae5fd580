"""C{ses://REGION}: Amazon SES v2 C{SendEmail} with the raw message.

The message bytes go as they are (C{Content.Raw.Data}, base64), with the
envelope: C{FromEmailAddress} is the envelope sender (left out for the null
sender: SES then takes the C{From} header), C{Destination.ToAddresses} the
envelope recipients (SES does not rewrite a raw message's header, so C{To},
C{Cc} and C{Bcc} stay as the message has them). SES takes at most 50
recipients a request: more are sent in several requests, each with its own
message id.

Credentials come from botocore's chain (the environment, the shared
credentials and config files, a profile's C{credential_process} or role,
container and instance metadata), resolved on the first send in the
reactor's thread pool and refreshed by botocore when they expire; the
request is signed with botocore's SigV4 signer (service C{ses}) in the
thread pool and sent with treq on the reactor.

| SES error (C{x-amzn-ErrorType}) | status | reply |
| --- | --- | --- |
| C{MessageRejected} | bounced | 554 5.7.1 |
| C{MailFromDomainNotVerifiedException} | bounced | 550 5.7.1 |
| C{BadRequestException}, other 400 | bounced | 554 5.6.0 |
| C{TooManyRequestsException} (429), C{LimitExceededException} | deferred | 451 4.7.0 |
| C{SendingPausedException}, C{AccountSuspendedException} | deferred | 451 4.7.0 |
| C{NotFoundException} (a missing configuration set) | deferred | 451 4.3.5 |
| 401/403 (credentials, permissions) | deferred | 451 4.7.0 |
| 5xx | deferred | 451 4.3.0 |

Account-wide states (paused, suspended, over quota) are deferred: the
message is not at fault, and it can go once the account is in order.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from twisted_mailout.apps.base import Envelope
from twisted_mailout.apps.httpapi import (
    HTTPAnswer,
    HTTPAPIDelivery,
    HTTPRequest,
    by_status,
    one_line,
)
from twisted_mailout.envelope import Reply

__all__ = ["SESDelivery", "ses_endpoint"]

#: The path of SES v2 C{SendEmail}.
SEND_PATH = "/v2/email/outbound-emails"

_REGION = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")

#: SES error codes that refuse the message, and their replies.
REFUSED = {
    "MessageRejected": (554, "5.7.1"),
    "MailFromDomainNotVerifiedException": (550, "5.7.1"),
    "BadRequestException": (554, "5.6.0"),
}
#: SES error codes that defer it, and their enhanced status codes.
DEFERRED = {
    "TooManyRequestsException": "4.7.0",
    "Throttling": "4.7.0",
    "ThrottlingException": "4.7.0",
    "LimitExceededException": "4.7.0",
    "SendingPausedException": "4.7.0",
    "AccountSuspendedException": "4.7.0",
    "NotFoundException": "4.3.5",
}


def ses_endpoint(region: str) -> str:
    """The SES v2 API's base URL in C{region}.

    @param region: e.g. C{"eu-west-1"}; C{cn-*} regions are under
        C{amazonaws.com.cn}.
    @return: C{"https://email.REGION.amazonaws.com"} (or C{.com.cn}).
    """
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://email.{region}.{suffix}"


class SESDelivery(HTTPAPIDelivery):
    """Amazon SES v2 C{SendEmail} with raw content (see the module docstring).

    @param region: the AWS region, e.g. C{"eu-west-1"}; L{None} for the one
        botocore's configuration names (C{AWS_REGION}, C{AWS_DEFAULT_REGION},
        the profile's C{region}), read now.
    @param endpoint: the API's base URL (tests: C{"http://127.0.0.1:PORT"});
        the region's SES endpoint when L{None}.
    @param configuration_set: the SES configuration set
        (C{ConfigurationSetName}), or L{None}.
    @param profile: the profile of the shared AWS files to take credentials
        (and the region) from; botocore's default (C{AWS_PROFILE}) when L{None}.
    @param credentials: botocore credentials to sign with instead of the
        chain (anything with C{get_frozen_credentials()}), or L{None}.
    @param timeout: seconds for one request.
    @param reactor: the reactor; the global one when L{None}.
    @param http_client: see L{HTTPAPIDelivery}.
    @raise ValueError: a bad region, endpoint or timeout, or no region at all.
    """

    scheme = "ses"
    provider = "SES"
    batch_size = 50

    def __init__(self, region: str | None = None, *, endpoint: str | None = None,
                 configuration_set: str | None = None, profile: str | None = None,
                 credentials: Any = None, timeout: float = 60.0, reactor: Any = None,
                 http_client: Any = None) -> None:
        import botocore.session

        self._session = botocore.session.Session(profile=profile)
        if region is None:
            region = self._session.get_config_variable("region")
            if not region:
                raise ValueError("ses:// needs a region (ses://eu-west-1), or one in AWS_REGION, "
                                 "AWS_DEFAULT_REGION or the AWS config file")
        if not _REGION.match(region):
            raise ValueError(f"ses://: {region!r} is not an AWS region name (e.g. eu-west-1)")
        if configuration_set is not None and not configuration_set:
            raise ValueError("ses://: configuration_set is empty")
        self.region = region
        self.configuration_set = configuration_set
        self.profile = profile
        self._given_endpoint = endpoint
        self._credentials = credentials
        self._lock = threading.Lock()
        super().__init__(endpoint=endpoint or ses_endpoint(region), timeout=timeout,
                         reactor=reactor, http_client=http_client)

    @classmethod
    def url_arguments(cls, url: str) -> dict[str, Any]:
        """The constructor's keyword arguments for C{url}.

        @param url: C{ses://REGION?endpoint=URL&configuration_set=NAME&
            profile=NAME&timeout=SECONDS} (C{ses://} alone: the configured
            region).
        @return: a dict for L{SESDelivery}.
        @raise ValueError: a user, password, port or path, an unknown or
            repeated parameter, a bad number.
        """
        parts = urlsplit(url)
        if parts.username is not None or parts.port is not None or parts.path not in ("", "/"):
            raise ValueError(f"{_no_secret(url)}: ses:// takes a region only (ses://eu-west-1); "
                             "credentials come from the AWS environment and files")
        if parts.fragment:
            raise ValueError(f"{url}: a delivery URL has no #fragment")
        out: dict[str, Any] = {}
        if parts.hostname:
            out["region"] = parts.hostname
        params = parse_qs(parts.query, keep_blank_values=True)
        for name, values in params.items():
            if len(values) != 1:
                raise ValueError(f"{url}: {name} given {len(values)} times")
            value = values[0]
            if name in ("endpoint", "configuration_set", "profile"):
                out[name] = value
            elif name == "timeout":
                try:
                    out["timeout"] = float(value)
                except ValueError:
                    raise ValueError(f"{url}: timeout must be a number, not {value!r}") from None
            else:
                raise ValueError(f"{url}: unknown parameter {name!r} for ses:// (endpoint, "
                                 "configuration_set, profile, timeout)")
        return out

    def url(self) -> str:
        query = [f"{k}={quote(v, safe='/:')}" for k, v in (
            ("endpoint", self._given_endpoint), ("configuration_set", self.configuration_set),
            ("profile", self.profile)) if v]
        return f"ses://{self.region}" + ("?" + "&".join(query) if query else "")

    # -- the request ----------------------------------------------------------

    def body(self, env: Envelope, recipients: list[str]) -> dict[str, Any]:
        """The JSON body of C{SendEmail} for C{recipients}.

        @return: C{{"Content": {"Raw": {"Data": BASE64}}, "Destination":
            {"ToAddresses": [...]}, "FromEmailAddress": SENDER,
            "ConfigurationSetName": NAME}} (the last two when set).
        """
        body: dict[str, Any] = {
            "Content": {"Raw": {"Data": base64.b64encode(env.data).decode("ascii")}},
            "Destination": {"ToAddresses": list(recipients)},
        }
        if env.sender:
            body["FromEmailAddress"] = env.sender
        if self.configuration_set:
            body["ConfigurationSetName"] = self.configuration_set
        return body

    def credentials(self) -> Any:
        """The credentials to sign with (blocking: botocore's chain may read
        files, run a process or ask the instance metadata service).

        @return: botocore credentials, resolved once and kept (botocore
            refreshes temporary ones).
        @raise LookupError: the chain found none.
        """
        with self._lock:
            if self._credentials is None:
                self._credentials = self._session.get_credentials()
                if self._credentials is None:
                    raise LookupError(
                        "no AWS credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                        "the shared credentials or config file, a role or instance metadata)")
            return self._credentials

    def build_request(self, env: Envelope, recipients: list[str]) -> HTTPRequest:
        """The signed C{SendEmail} request (in the thread pool).

        @raise LookupError: no credentials.
        """
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        frozen = self.credentials().get_frozen_credentials()
        data = json.dumps(self.body(env, recipients)).encode("utf-8")
        url = self.endpoint + SEND_PATH
        request = AWSRequest(method="POST", url=url, data=data,
                             headers={"Content-Type": "application/json"})
        SigV4Auth(frozen, "ses", self.region).add_auth(request)
        headers = {k: v if isinstance(v, str) else v.decode("ascii")
                   for k, v in request.headers.items()}
        return HTTPRequest("POST", url, headers, data)

    def interpret(self, answer: HTTPAnswer) -> Reply:
        """The reply an SES answer gives (see the module docstring); on
        success C{250 2.0.0 Ok MESSAGEID}."""
        document: Any = None
        try:
            document = json.loads(answer.body or b"null")
        except ValueError:
            document = None
        if not isinstance(document, dict):
            document = {}
        if 200 <= answer.code < 300:
            mid = document.get("MessageId")
            if isinstance(mid, str) and mid:
                return Reply(250, f"2.0.0 Ok {one_line(mid, 200)}")
            return by_status(self.provider, answer.code, "(no MessageId in the answer)")
        kind = (answer.header("x-amzn-errortype") or str(document.get("__type") or "")
                or str(document.get("code") or ""))
        kind = kind.split(":", 1)[0].rsplit("#", 1)[-1].strip()
        message = document.get("message") or document.get("Message") or ""
        what = one_line(f"{kind}: {message}" if kind else str(message))
        text = f"SES HTTP {answer.code} {what}".rstrip()
        if kind in REFUSED:
            code, enhanced = REFUSED[kind]
            return Reply(code, f"{enhanced} {text}")
        if kind in DEFERRED:
            return Reply(451, f"{DEFERRED[kind]} {text}")
        return by_status(self.provider, answer.code, what)


def _no_secret(url: str) -> str:
    """C{url} with any user information dropped, for messages."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()

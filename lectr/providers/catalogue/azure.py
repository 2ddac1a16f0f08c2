"""Azure OpenAI: an OpenAI-dialect provider whose keys each name their
resource (``https://<resource>.openai.azure.com``) and API version.

Clients call ``/azure/v1/<rest>`` with the deployment name as the model;
Lectr sends ``<key base URL>/openai/deployments/<model>/<rest>?api-version=…``
(requests without a model, such as files, and the Responses API, which names
the deployment in its body, go to ``/openai/<rest>``), with the key in the
``api-key`` header.
"""

from urllib.parse import quote

from lectr.providers.base import API_KEY, KeyOptions, Provider
from lectr.providers.dialects import OPENAI
from lectr.usage.stream_usage import NO_STREAM_USAGE

DEFAULT_API_VERSION = "2024-10-21"
#: the first API version that accepts ``stream_options`` (earlier ones answer
#: 400 "Unrecognized request argument supplied: stream_options")
STREAM_OPTIONS_SINCE = "2024-09-01"


class Azure(Provider):
    name = "azure"
    display_name = "Azure OpenAI"
    dialect = OPENAI
    default_base_url = None  # each key names its resource
    key_base_url_hosts = (
        "*.openai.azure.com",
        "*.cognitiveservices.azure.com",
        "*.services.ai.azure.com",
    )
    auth = API_KEY
    accepts_api_version = True
    models_path = b"/v1/models"
    order = 10

    def upstream_path(self, api_path: bytes, model: str | None, options: KeyOptions) -> bytes:
        rest = api_path[3:] if api_path.startswith(b"/v1/") else api_path
        if rest == b"/responses" or rest.startswith(b"/responses/"):
            # the Responses API is not per deployment: /openai/responses, the
            # deployment named by the body's model (API versions 2025-03-01-preview on)
            return b"/openai" + rest
        if model:
            deployment = quote(model, safe="")
            if not deployment.strip("."):  # never a dot segment
                deployment = deployment.replace(".", "%2E")
            return b"/openai/deployments/" + deployment.encode("ascii") + rest
        return b"/openai" + rest

    def stream_usage(self, options: KeyOptions) -> frozenset[str]:
        """Only versions from 2024-09-01 on accept ``stream_options`` (on
        chat); a key of an older one has its streams estimated. (A version
        that is not a date, as the v1 API's ``preview``, is a recent one.)"""
        version = options.api_version
        if version is None or not version[:4].isdigit() or version[:10] >= STREAM_OPTIONS_SINCE:
            return self.stream_usage_paths
        return NO_STREAM_USAGE

    def query(self, query: bytes, options: KeyOptions) -> bytes:
        version = (options.api_version or DEFAULT_API_VERSION).encode("ascii")
        kept = [p for p in query[1:].split(b"&") if p and not p.startswith(b"api-version=")]
        return b"?" + b"&".join([b"api-version=" + version, *kept])


PROVIDERS = [Azure]

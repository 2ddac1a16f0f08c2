"""twistd plugin: ``twistd lectr``.

Discovery imports this file, so it names the real module by string and
imports nothing heavy (no reactor, no treq): see twisted/plugins/twisted_web.py.
"""

from twisted.application.service import ServiceMaker

lectr = ServiceMaker(
    "Lectr",
    "lectr.tap",
    "Lectr: self-hosted gateway for AI providers (OpenAI, Anthropic)",
    "lectr",
)

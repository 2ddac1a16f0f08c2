"""Which OpenAI-dialect streams a provider may be asked for their usage
report (``stream_options.include_usage``): a provider names one of these
sets (``Provider.stream_usage_paths``), and the request plan
(:func:`lectr.usage.meters.plan_request`) asks only on those paths. A leaf
module: the providers and the meters both import it."""

#: chat, everywhere it is accepted
CHAT_STREAM_USAGE = frozenset({"/v1/chat/completions"})
#: chat and legacy completions (OpenAI's own API accepts it on both)
CHAT_AND_COMPLETIONS_STREAM_USAGE = CHAT_STREAM_USAGE | {"/v1/completions"}
#: none: bodies go up as the client wrote them
NO_STREAM_USAGE: frozenset[str] = frozenset()

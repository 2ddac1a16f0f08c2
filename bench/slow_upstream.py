"""A slow-dripping fake provider for the memory benchmark: every streaming
request gets its headers and a first SSE event at once, then one event every
few seconds until the client goes away. /openai/v1/models answers 200 so a
provider key can be stored against it."""

import argparse
import json

from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.web import server
from twisted.web.resource import Resource

EVENT = (
    "data: "
    + json.dumps(
        {
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": "tick "}}],
        }
    )
    + "\n\n"
).encode()


class Slow(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.open = set()
        LoopingCall(self.tick).start(5.0, now=False)

    def tick(self):
        for request in list(self.open):
            request.write(EVENT)

    def render(self, request):
        if request.path.endswith(b"/models"):
            request.setHeader(b"content-type", b"application/json")
            return b'{"object":"list","data":[]}'
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(EVENT)
        self.open.add(request)
        request.notifyFinish().addBoth(lambda _: self.open.discard(request))
        return server.NOT_DONE_YET


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    site = server.Site(Slow())
    site.log = lambda request: None
    reactor.listenTCP(a.port, site, interface="127.0.0.1", backlog=4096)
    reactor.run()


if __name__ == "__main__":
    main()

"""Lectr's own HTTP/1.1 transport for the proxy port: a lean server protocol
(:mod:`lectr.http.server`) and a lean keep-alive upstream client
(:mod:`lectr.http.client`), both parsing with llhttp (``httptools``) on the
Twisted reactor. See docs/http.md for why and for the contract."""

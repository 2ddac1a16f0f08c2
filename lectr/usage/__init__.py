"""Usage logging: what each proxied request used, recorded without slowing
the request down."""

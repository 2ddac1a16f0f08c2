"""The policy chain: every decision between authentication and the upstream
call, as ordered steps run by one driver (:mod:`lectr.policy.chain`)."""

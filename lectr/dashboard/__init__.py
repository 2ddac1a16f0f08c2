"""The dashboard: static files (plain ES modules, no build step) served by
the admin port at ``/`` and under ``/ui/<content hash>/``; the browser calls
the admin API with a bearer token. See docs/dashboard.md."""

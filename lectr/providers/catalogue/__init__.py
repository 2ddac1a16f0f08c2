"""The built-in providers: one module each.

Every module here defines ``PROVIDERS``, a list of
:class:`~lectr.providers.base.Provider` subclasses.
:func:`lectr.providers.registry.discover` imports them all; nothing else in
Lectr names a provider. A ``lectr/providers/catalogue/`` directory anywhere
else on ``sys.path`` (a plugin distribution, or a directory named in
``PYTHONPATH``) adds its modules too, without an ``__init__.py``.
"""

"""The built-in providers: one module each.

Every module here defines ``PROVIDERS``, a list of :class:`~lectr.providers.base.Provider`
subclasses. :func:`lectr.providers.registry.discover` imports them all; nothing else in
Lectr names a provider. The package path is extended like a namespace
package, so a ``lectr/providers/catalogue/`` directory elsewhere on
``sys.path`` (a plugin distribution) adds its modules too.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

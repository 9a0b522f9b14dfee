"""Shipping agent code to workers with cloudpickle (coordinator -> worker only).

Modules the user wrote (anything imported from outside the standard library and site-packages,
such as the seed's ``my_project.models``) are pickled *by value*, so workers need not have them;
installed libraries are pickled by reference and must be installed on the workers.  A class is
pickled once and identified by the hash of its pickle, so a worker receives it once.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import site
import sys
import sysconfig
import threading
from types import ModuleType
from typing import Any

import cloudpickle

_lock = threading.Lock()
_OWN_PACKAGES = {"pyorchestrate", "pyorchestrate_worker"}


def _installed_roots() -> tuple[str, ...]:
    paths = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            paths.add(os.path.realpath(path))
    try:
        paths.update(os.path.realpath(p) for p in site.getsitepackages())
    except AttributeError:  # some virtualenv layouts lack it
        pass
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user_site:
        paths.add(os.path.realpath(user_site))
    paths.add(os.path.realpath(sys.base_prefix))
    return tuple(p + os.sep for p in paths)


_INSTALLED = _installed_roots()


_verdicts: dict[tuple[str, int], bool] = {}  # (module name, id) -> is it the user's own?
_roots_cache: tuple[int, list[str]] = (-1, [])


def _is_user_module(module: ModuleType) -> bool:
    key = (module.__name__, id(module))
    verdict = _verdicts.get(key)
    if verdict is None:
        verdict = _verdicts[key] = _judge(module)
    return verdict


def _judge(module: ModuleType) -> bool:
    root = module.__name__.partition(".")[0]
    if root in _OWN_PACKAGES or root == "__main__" or root in sys.builtin_module_names:
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False
    return not os.path.realpath(path).startswith(_INSTALLED)


def user_module_roots() -> list[str]:
    """Top-level names of the user's own modules currently imported (recomputed only when
    ``sys.modules`` changes: resolving every module's real path costs milliseconds)."""
    global _roots_cache
    if _roots_cache[0] == len(sys.modules):
        return list(_roots_cache[1])
    roots = set()
    for name, module in list(sys.modules.items()):
        if module is not None and name.partition(".")[0] not in roots and _is_user_module(module):
            roots.add(name.partition(".")[0])
    result = sorted(r for r in roots if r in sys.modules)
    _roots_cache = (len(sys.modules), result)
    return list(result)


def _dumps(obj: Any) -> bytes:
    # register the user's modules by value only for the duration of this pickle, so we do not
    # change how the user's own cloudpickle calls behave
    with _lock:
        roots = user_module_roots()
        registered = []
        for root in roots:
            try:
                cloudpickle.register_pickle_by_value(sys.modules[root])
                registered.append(root)
            except ValueError:  # already registered by the user: leave it as they set it
                pass
        try:
            return cloudpickle.dumps(obj, protocol=5)
        finally:
            for root in registered:
                cloudpickle.unregister_pickle_by_value(sys.modules[root])


class ShippingError(TypeError):
    """An agent class or config that cannot be sent to a worker."""


def pack_class(agent_class: type, config_class: type) -> tuple[str, bytes]:
    """Pickle an agent class with its config class; return ``(class_id, blob)``."""
    try:
        blob = _dumps((agent_class, config_class))
    except Exception as exc:
        culprit = _unpicklable_attribute(agent_class, config_class)
        hint = (f": {culprit[0]} attribute {culprit[1]!r} ({culprit[2]}) cannot be pickled. Set it on the instance "
                "in setup() (or store something picklable, like a path or an address, and open the resource "
                "there)" if culprit else "")
        raise ShippingError(
            f"cannot send agent class {agent_class.__qualname__} to workers: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    return hashlib.sha256(blob).hexdigest()[:24], blob


def _unpicklable_attribute(*classes: type) -> tuple[str, str, str] | None:
    """The first class attribute (of the given classes or their user-defined bases) that cannot
    be pickled: ``(class name, attribute, type name)``."""
    for cls in classes:
        for klass in cls.__mro__:
            if klass is object or klass.__module__.startswith("pyorchestrate"):
                continue
            for key, value in vars(klass).items():
                if key.startswith("_") or isinstance(value, (type, staticmethod, classmethod, property)) \
                        or inspect.isfunction(value):
                    continue
                try:
                    _dumps(value)
                except Exception:
                    return klass.__qualname__, key, type(value).__name__
    return None


def class_fingerprint(*classes: type) -> str:
    """A digest of what the classes are (their MROs' qualified names and source), the same in every
    process: a restarted coordinator adopts a running agent only if its class and config are
    unchanged.  (Pickles of classes sent by value are not comparable across processes: cloudpickle
    gives each a random tracker id.)"""
    digest = hashlib.blake2b(digest_size=16)
    for cls in classes:
        for klass in cls.__mro__:
            if klass.__module__ in ("builtins", "abc"):
                continue
            digest.update(f"{klass.__module__}.{klass.__qualname__}\n".encode())
            try:
                digest.update(inspect.getsource(klass).encode())
            except (OSError, TypeError):  # no source (a REPL, a C class): its name must do
                pass
    return digest.hexdigest()


_PLAIN = frozenset({str, int, float, bool, bytes, type(None)})


def _is_plain(value: Any, depth: int = 0) -> bool:
    """Builtin data only (exact types, shallow nesting): what plain pickle writes exactly as
    cloudpickle would (same bytes), without cloudpickle's by-value bookkeeping."""
    kind = value.__class__
    if kind in _PLAIN:
        return True
    if depth >= 3:
        return False
    if kind is list or kind is tuple:
        return all(_is_plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(k.__class__ in _PLAIN and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def pack_config(config: Any, agent_name: str, plugin: Any = None) -> bytes:
    """Pickle a config's own values (and a custom plugin), naming what cannot be pickled."""
    values = config.overrides()
    if plugin is None and _is_plain(values):
        # most configs: a few numbers and strings.  cloudpickle's path (registering the user's
        # modules by value, under a lock) cost half of registering an agent for the same bytes
        return pickle.dumps({"config": values, "plugin": None}, protocol=5)
    if plugin is not None:
        try:
            _dumps(plugin)
        except Exception as exc:
            raise ShippingError(f"agent {agent_name!r}: custom_plugin cannot be sent to a worker: "
                                f"{type(exc).__name__}: {exc}. Plugins must open their resources in initialize().") from exc
    try:
        return _dumps({"config": values, "plugin": plugin})
    except Exception:
        for key, value in values.items():
            try:
                _dumps(value)
            except Exception as exc:
                raise ShippingError(
                    f"agent {agent_name!r}: config attribute {key!r} ({type(value).__name__}) cannot be "
                    f"sent to a worker: {type(exc).__name__}: {exc}. Store something picklable instead "
                    "(for example a path or an address) and open the resource in setup()."
                ) from exc
        raise


def unpack_class(blob: bytes) -> tuple[type, type]:
    return cloudpickle.loads(blob)


def cached_class(cache: dict[str, tuple[type, type]], lock: threading.Lock, class_id: str,
                 blob: bytes | None) -> tuple[type, type]:
    """``class_id``'s (agent class, config class) from ``cache``, unpickled from ``blob`` by the
    first caller.  Under ``lock``, which only agents' threads take: unpickling imports the class's
    modules (seconds for a big library), and two agents of a class not loaded yet import it once."""
    classes = cache.get(class_id)
    if classes is None:
        with lock:
            classes = cache.get(class_id)
            if classes is None:
                if blob is None:
                    raise LookupError(f"class {class_id} was never sent here")
                classes = cache[class_id] = unpack_class(blob)
    return classes


#: config blobs that set nothing (no overrides, no custom plugin): most agents' (register_agent
#: makes one such blob per class and sends it with each); a fresh default Config for those,
#: without unpickling the blob again for every start.  Bounded: cleared when full.
_DEFAULT_BLOBS: set[bytes] = set()
_DEFAULT_BLOBS_MAX = 1024


def unpack_config(config_class: type, blob: bytes) -> tuple[Any, Any]:
    """``(config, custom plugin or None)`` from :func:`pack_config`'s blob."""
    if blob in _DEFAULT_BLOBS:
        return config_class(), None
    packed = cloudpickle.loads(blob)
    if not packed["config"] and packed["plugin"] is None:
        if len(_DEFAULT_BLOBS) >= _DEFAULT_BLOBS_MAX:
            _DEFAULT_BLOBS.clear()
        _DEFAULT_BLOBS.add(blob)
    return config_class(**packed["config"]), packed["plugin"]

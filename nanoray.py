"""
nanoray.py -- a Ray-shaped distributed engine in one file: tasks, actors, object refs, a shared-memory
object store, resources and placement groups, over processes on one machine or on several.

Stands in for Ray core. The API is a strict subset of Ray's (same names, arguments and semantics), so
`import nanoray as ray` runs a Ray program that stays inside the subset, and a program written against
nanoray runs unchanged on real Ray, the scale-out path (test_all.py runs one program on both).
Keeps: init/shutdown/is_initialized; @remote functions (num_cpus, num_gpus, resources, max_retries,
retry_exceptions, num_returns, scheduling_strategy) and actors (max_restarts, max_task_retries,
max_concurrency threads, async methods, named and detached actors), .options(), get/wait/put with
timeouts, kill, get_actor, cluster/available_resources, nodes, get_gpu_ids, placement groups (PACK,
SPREAD, STRICT_PACK, STRICT_SPREAD) as `nanoray.util.*`, the `exceptions` namespace. Drops: the
dashboard, runtime_env, object spilling and lineage reconstruction (a lost object raises
ObjectLostError), generators, cancel, Ray Client, autoscaling, every non-Python language. Differs: an
actor holds 0 CPUs unless asked (Ray also needs 1 free CPU to place it); bundles on a dead node are
not rescheduled; sync methods of an async actor run on threads.

How it works. Processes: one *head* per cluster (object directory, reference counts, scheduler, actor
table, placement groups, and the node manager of its own machine); one *raylet* per extra machine
(spawns that node's workers, owns its arena, moves objects between nodes); *workers* (one process each,
reused by tasks, dedicated to an actor); *drivers*. Everyone talks to the head over TCP in pickles, so
every connection first proves a shared secret (HMAC challenge both ways). A worker is a fresh
interpreter (never a fork: forking after torch/CUDA initialised is unsafe) started with subprocess, so
it does not re-import the driver's __main__: functions and classes of `__main__` or of a function's
locals travel *by value* (code + the globals they use, like Ray's cloudpickle), the rest by reference.
A task's results are pushed to the process that submitted it (its owner), which waits for them.
  Objects. <= 100 KiB travel inside messages and live in the head's memory; larger ones live in the
node's *arena*, one sparse file in /dev/shm that every process of the node maps. A writer asks the
head for a region and copies its pickle stream and out-of-band buffers (pickle protocol 5: numpy
arrays, and torch CPU tensors through a reducer here) into it; a reader maps the region copy-on-write,
so its arrays and tensors view the store without a copy and its writes stay private. Reference
counting, with the head as the single owner: a process reports its first and last ObjectRef of an id
("+"/"-"); the head keeps the holders per object, plus pins (tasks using it as an argument, objects
containing it). One connection's messages arrive in order, so a ref passed to a task is pinned before
the sender's "-" arrives. An object without holder and pin is freed; its region returns to the
allocator once no process maps it (each mapping reports "m"/"u": views die -> the mapping dies ->
"u"). The head reclaims a crashed worker's regions; a killed node's arena is removed by its janitor
(a tiny process that waits on a pipe for its node to die).
  Failures: a dead worker (EOF on its socket, or its exit code) has its task retried up to max_retries
(default 3), then the ref raises WorkerCrashedError; an actor restarts up to max_restarts (state lost;
running calls fail with RayActorError, later ones reach the new process; once out of restarts,
ActorDiedError). A dead node loses the objects only it had (ObjectLostError). get(timeout=) never
waits past its timeout.

Commands:
  python nanoray.py                      # self-test (seconds): every API on a 2-CPU local cluster
  python nanoray.py --bench              # vs the `ray` package in the same run (when installed)
  python nanoray.py start --head --port 6379 [--node-ip-address IP] [--num-cpus N] [--num-gpus N]
  python nanoray.py start --address HOST:6379          # join; both read the secret from NANORAY_SECRET,
                                                       # else ~/.nanoray/secret (mode 0600, made by --head)
  python nanoray.py status [--address HOST:PORT]       # nodes, resources, actors, tasks, store use
  python nanoray.py stop                               # stop the nodes started on this machine

torchrun's SPMD code under one driver (how ppo.py places its roles; test_all.py runs this with gloo):
reserve the GPUs with a placement group, start one actor per rank in its bundle and give each the
environment torchrun would (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): torchrun code
(nanotron's mesh) then runs unchanged in the actors. Rank 0 tells its node address and a free port,
so the group also forms across machines. Engines get their own placement group:
    pg = ray.util.placement_group([{"CPU": 1, "GPU": 1}] * W, strategy="PACK"); ray.get(pg.ready())
    ranks = [Trainer.options(num_gpus=1, scheduling_strategy=ray.util.scheduling_strategies.
             PlacementGroupSchedulingStrategy(pg, i)).remote() for i in range(W)]
    addr, port = ray.get(ranks[0].free_address.remote())
    ray.get([r.join.remote(rank=i, world=W, addr=addr, port=port) for i, r in enumerate(ranks)])
    # join(): os.environ.update(RANK=..., MASTER_ADDR=...); torch.distributed.init_process_group()

First read (~600 lines of code, ~1,000 with their comments), in this order:
  1. this docstring, then the opening comment under every section banner (what the part does, and why);
  2. ObjectRef and _Client: addref/delref, send, pump, fetch, store (how any process talks to the head);
  3. the public API: init, get, put, wait, RemoteFunction.remote, ActorMethod.remote;
  4. _Head: the records (_Obj, _Task, _Actor, _Worker), loop, _on_refs -> _maybe_free, _on_get -> _notify,
     _on_submit -> _check_deps -> _runnable -> _schedule -> _place -> _start -> _dispatch, _on_done -> _finish,
     _worker_dead;
  5. _worker_main and _run_call.
Independent chapters, for when you need them: serialization (by-value functions, tensors, the object layout),
the wire (frames + HMAC), the arena and its allocator, placement groups (_place_pg), actor restarts
(_actor_lost), objects across machines (_pull, _NodeManager.pull), the CLI.

The life of one task, `ref = f.remote(x_ref); get(ref)`, as a trace through the code:
  driver  RemoteFunction.remote: f pickled once, pack_args (x_ref becomes an _Arg), send ("submit", ...)
  head    _on_submit -> _admit (the return id exists, pending; x is pinned) -> _check_deps (is x ready?)
          -> _runnable (a FIFO queue per resource shape) -> _schedule -> _place (a node whose pool has room:
          the resources are taken) -> _start (an idle worker, else a new one) -> _dispatch ("exec", ...)
  worker  _worker_main: resolve_args maps x from the arena (or unpickles it from the message), runs f;
          _run_call stores the result (inline, or a region got by rpc "alloc") and sends ("done", ...)
  head    _on_done -> _release_worker (resources back, the worker idle) -> _finish: _seal the result, unpin x,
          push ("objs", None, [(rid, descriptor)]) to the owner -> _schedule starts the next queued task
  driver  get -> fetch: the pushed descriptor is (or soon will be) in descs, no request needed; value()
          unpickles it (a zero-copy view for arena objects).

Sections: errors . serialization . wire . resources and arena . client side (ObjectRef, _Client) . public
API . head . node manager, raylet, worker . CLI, self-test, bench.
"""

import atexit
import builtins
import ctypes
import hashlib
import hmac
import importlib
import inspect
import io
import itertools
import json
import marshal
import mmap
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import weakref
from collections import Counter, deque
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields

INLINE_MAX = 100 * 1024  # objects up to this size travel inside messages (Ray's max_direct_call_object_size)
UNIT = 10_000  # resources are counted in 1/10000 units: fractional GPUs without float drift
MAX_FRAME = 1 << 28  # a length header above 256 MiB is garbage: no message is that big
AUTH_TIMEOUT = 5.0  # seconds a peer gets to prove the secret before it is dropped
RPC_TIMEOUT = 120.0  # an internal request to the head that takes longer than this means the head is stuck
KEEPALIVE = (10, 5, 4)  # TCP keepalive (Linux): probe a peer silent for 10 s, every 5 s; 4 unanswered: it is dead
# seconds a new worker process gets to connect (Ray's worker_register_timeout_seconds): one stuck importing would
# otherwise hold its CPUs and its task forever. Then it is killed and its task retried (max_retries) or failed
WORKER_START_TIMEOUT = float(os.environ.get("NANORAY_WORKER_START_TIMEOUT", 60))
PAGE = mmap.ALLOCATIONGRANULARITY  # arena regions start on page boundaries (mmap offsets must)
HERE = os.path.dirname(os.path.abspath(__file__))
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
STATE_DIR = os.environ.get("NANORAY_STATE_DIR") or os.path.join(tempfile.gettempdir(), f"nanoray-{os.getuid()}")
SECRET_FILE = os.path.join(os.path.expanduser("~"), ".nanoray", "secret")
_BY_VALUE = {"__main__"}  # modules whose functions and classes ship by value (locals always do)


def _log(msg: str) -> None:
    print(f"[nanoray {os.getpid()} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- errors: the `exceptions` namespace (ray.exceptions) ------------------------------------------
# In a distributed program an error happens in one process and is seen in another, later, through get(). So
# errors are values: a failed task's returns become objects whose descriptor is ("error", pickled exception),
# stored like any result, and get() raises what it unpickles. Which class tells the caller what failed:
# RayTaskError (the user's code raised: the bug is yours, and it is not retried unless retry_exceptions),
# WorkerCrashedError / RayActorError / ActorDiedError (a process died: system failures, retried or restarted
# per the options), ObjectLostError (the data is gone), GetTimeoutError (nothing failed, it is just not ready).
# Ray has many more classes; these are the ones a Ray program catches in practice, with the same names.

class RayError(Exception):
    """Base of every nanoray error."""


class RayTaskError(RayError):
    """An exception raised by remote code, with the remote traceback. `get` raises it as an instance of
    both RayTaskError and the original class (as Ray does), so `except ValueError` still catches it."""
    _dual: dict = {}  # the cause's class -> the class deriving from both (made once)

    def __init__(self, function_name="", traceback_str="", cause=None, pid=0):
        super().__init__(function_name, traceback_str, cause, pid)
        self.function_name, self.traceback_str, self.cause, self.pid = function_name, traceback_str, cause, pid

    def __str__(self):
        return f"{self.function_name} failed in worker pid {self.pid}:\n{self.traceback_str.rstrip()}"

    def as_instanceof_cause(self):
        """The error get() raises: an instance of RayTaskError(KeyError) when the cause was a KeyError, so both
        `except KeyError` and `except RayTaskError` catch it; self when no such class can be made."""
        cause = self.cause
        if cause is None or isinstance(cause, RayTaskError):
            return self
        try:  # a class deriving from both; creating it fails for classes that cannot be subclassed
            cls = self._dual.get(type(cause)) or self._dual.setdefault(
                type(cause), type(f"RayTaskError({type(cause).__name__})", (RayTaskError, type(cause)), {}))
            err = cls.__new__(cls)  # __new__ without __init__: the cause's __init__ may want arguments we lack
        except TypeError:
            return self
        # the cause's instance attributes (a custom .code survives; FOOTGUN: fields kept in C slots, such as
        # OSError.errno, do not), then ours on top; args as the cause had them. RayTaskError comes first in the
        # bases, so str(err) is ours: the remote traceback.
        err.__dict__.update(cause.__dict__)
        err.__dict__.update(self.__dict__)
        err.args = cause.args
        return err


class RayActorError(RayError):
    """An actor method could not run: the actor process died or was killed."""


class ActorDiedError(RayActorError):
    """The actor is dead (out of restarts, killed, or its constructor raised)."""


class WorkerCrashedError(RayError):
    """The worker process running the task died, and the task ran out of retries."""


class ObjectLostError(RayError):
    """The object's only copy was on a node that died (or it was freed): there is no lineage to rebuild it."""


class ObjectStoreFullError(RayError):
    """The node's arena has no region large enough for a new object."""


class RaySystemError(RayError):
    """The connection to the head was lost."""


class GetTimeoutError(RayError, TimeoutError):
    """get() did not finish within its timeout."""


exceptions = types.SimpleNamespace(**{e.__name__: e for e in (
    RayError, RayTaskError, RayActorError, ActorDiedError, WorkerCrashedError, ObjectLostError, RaySystemError,
    ObjectStoreFullError, GetTimeoutError)})


# ---- serialization: by-value code, zero-copy tensors, the object layout ---------------------------
# A worker cannot import the driver's __main__ or a function's local scope, so such functions travel
# as (marshalled code, the globals it names, closure cells); classes as (bases, attribute dict). The
# reconstructor first looks for the same object in the receiving process (the driver gets its own
# classes back, so `except MyError` works) and builds a copy only when it is not there.
#   Ray ships code with cloudpickle (a third-party pickler that can serialise any function) and data with
# pickle protocol 5, whose out-of-band buffers let a numpy array's bytes skip the pickle stream and land in
# the shared store as they are. nanoray keeps exactly that split with the standard library alone: a Pickler
# subclass whose reducer_override handles by-value code, ObjectRefs and torch CPU tensors, and leaves every
# other object to pickle's own rules (so module-level functions and classes go by reference, a name the
# worker imports: it has the driver's sys.path, see "bind"). Everything a value needs becomes one flat byte
# layout (end of this section) that can be copied into a message or into the arena with the same code.

def _by_value(obj) -> bool:
    """Whether a function or class must travel as code (the worker cannot import it by name): it lives in
    a module listed in _BY_VALUE (the driver's __main__), inside a function's locals, or is a lambda."""
    qual = getattr(obj, "__qualname__", "")
    return getattr(obj, "__module__", None) in _BY_VALUE or "<locals>" in qual or qual == "<lambda>"


def _lookup(module, qualname, kind):
    """The receiver's own object named module.qualname if it has one of that kind, else None. Only modules
    already imported count (no import is triggered here), and locals never resolve: they have no name."""
    obj = sys.modules.get(module)
    if obj is None or "<locals>" in qualname:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, kind) else None


def _code_names(code, out):
    """Every name a code object (and the code of its nested functions, lambdas, comprehensions) looks up."""
    out.update(code.co_names)  # globals and attribute names; only keys of the globals dict are kept
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code_names(c, out)
    return out


_EMPTY = object()  # an empty closure cell


def _reduce_function(fn):
    """A function as a 6-item reduce tuple: (rebuild, args, state, -, -, state setter). Pickle first builds
    the skeleton from args and memoises it, then pickles state, then calls the setter: the order that lets a
    function reference itself through its globals or closure.
    FOOTGUN: the globals it names are copied at pickling time into the copy's own globals dict, so a by-value
    function that assigns a global (`global n; n += 1`) changes its private copy, never the driver's, and two
    by-value functions never share one globals dict (not even when pickled together). A name used as an
    attribute (`self.lock`) also captures a global of the same name, if there is one; an unpicklable one makes
    the call fail."""
    g = fn.__globals__
    cells = []
    for c in fn.__closure__ or ():
        try:
            cells.append(c.cell_contents)
        except ValueError:  # a closure variable not assigned yet (e.g. defined later in the enclosing function)
            cells.append(_EMPTY)
    # state comes after the skeleton is memoised: a function that names itself (recursion) just works
    state = ({n: g[n] for n in _code_names(fn.__code__, set()) if n in g}, fn.__defaults__,
             fn.__kwdefaults__, cells, fn.__dict__, fn.__doc__)
    # FOOTGUN: marshal's bytecode format is tied to the Python version: every machine of a cluster must run the
    # same minor version (3.x), or by-value functions fail to load (Ray has the same rule)
    args = (marshal.dumps(fn.__code__), fn.__name__, fn.__qualname__, fn.__module__, len(cells))
    return _make_function, args, state, None, None, _set_function_state


def _make_function(code, name, qualname, module, ncells):
    """The receiver's own function when it has it, else a skeleton: code + empty globals and cells."""
    fn = _lookup(module, qualname, types.FunctionType)
    if fn is None:  # a skeleton: its globals and cells are filled by _set_function_state
        g, closure = {"__builtins__": builtins, "__name__": module}, tuple(types.CellType() for _ in range(ncells))
        fn = types.FunctionType(marshal.loads(code), g, name, None, closure or None)
        fn.__qualname__, fn.__nanoray_by_value__ = qualname, True
    return fn


def _set_function_state(fn, state):
    """Fill a skeleton's globals, defaults, cells, __dict__ and doc; the receiver's own function is untouched."""
    if not fn.__dict__.get("__nanoray_by_value__"):
        return fn  # the receiving process's own function: leave it alone
    g, fn.__defaults__, fn.__kwdefaults__, cells, d, fn.__doc__ = state
    fn.__globals__.update(g)
    for cell, value in zip(fn.__closure__ or (), cells):
        if value is not _EMPTY:
            cell.cell_contents = value
    fn.__dict__.update(d)
    return fn


def _reduce_class(cls):
    """A class as (metaclass, name, bases) for the skeleton, its attribute dict as state (methods go by value
    through _reduce_function, so a class and the functions inside it travel together)."""
    d = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    return (_make_class, (type(cls), cls.__name__, cls.__qualname__, cls.__module__, cls.__bases__), d,
            None, None, _set_class_state)


def _make_class(meta, name, qualname, module, bases):
    """The receiver's own class when it has it (so isinstance and except clauses match), else an empty one."""
    cls = _lookup(module, qualname, type)
    if cls is None:
        cls = meta(name, bases, {"__module__": module, "__qualname__": qualname, "__nanoray_by_value__": True})
    return cls


def _set_class_state(cls, d):
    """Attach the attributes to a class built here; a class the receiver already had is left as it is."""
    if cls.__dict__.get("__nanoray_by_value__"):
        for k, v in d.items():
            if k not in ("__module__", "__qualname__"):
                setattr(cls, k, v)
    return cls


def _tensor_from_buffer(buf, dtype, shape, requires_grad):
    """Rebuild a CPU tensor on top of `buf` (a view of the store or of a message): no copy."""
    import torch  # only processes that receive tensors pay for importing torch
    mv, dt = memoryview(buf), getattr(torch, dtype)
    # bytes -> uint8 tensor -> reinterpret as dtype -> shape; frombuffer needs a writable buffer to avoid a
    # warning, which _loads guarantees. The tensor keeps `buf` (and so the arena mapping) alive.
    t = torch.frombuffer(mv, dtype=torch.uint8).view(dt).reshape(shape) if mv.nbytes else torch.empty(shape, dtype=dt)
    return t.requires_grad_() if requires_grad else t


class _Pickler(pickle.Pickler):
    """Protocol 5 with out-of-band buffers, plus: ObjectRefs are recorded (the head pins them while the
    containing object lives), CPU tensors give their memory as a buffer, by-value code as above."""

    def __init__(self, file, buffers):
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.refs, self.keep = [], []  # ids of ObjectRefs inside; temporaries the buffers point into

    def reducer_override(self, obj):  # called for every object but the plain containers and scalars
        # returning NotImplemented hands the object back to pickle's normal rules (by reference, __reduce__)
        t = type(obj)
        if t is ObjectRef:
            self.refs.append(obj._id)
            return ObjectRef, (obj._id,)
        if t is types.FunctionType:
            return _reduce_function(obj) if _by_value(obj) else NotImplemented
        if isinstance(obj, type):
            return _reduce_class(obj) if _by_value(obj) else NotImplemented
        if t is types.ModuleType:  # a module a by-value function uses (np, torch): re-imported by name
            return importlib.import_module, (obj.__name__,)
        # the wrappers found in a by-value class's __dict__, which plain pickle refuses
        if t is staticmethod or t is classmethod:
            return t, (obj.__func__,)
        if t is property:
            return property, (obj.fget, obj.fset, obj.fdel, obj.__doc__)
        torch = sys.modules.get("torch")  # no torch imported -> no tensors can exist
        # the zero-copy path takes exact torch.Tensor on the CPU, strided, with no autograd graph; the rest
        # (CUDA tensors, nn.Parameter, sparse, non-leaf) fall back to torch's own pickling: the bytes go inside
        # the pickle stream, one more copy each way, and a CUDA tensor needs a GPU in the receiver
        if torch is not None and t is torch.Tensor and obj.device.type == "cpu" and obj.layout == torch.strided \
                and obj.grad_fn is None:
            c = obj.detach().contiguous()  # a copy only when the tensor is not contiguous
            self.keep.append(c)  # the buffer below is a raw pointer: c must outlive the write of the object
            n = c.numel() * c.element_size()
            # the tensor's bytes as a buffer without numpy: a ctypes array over its data pointer
            raw = (ctypes.c_ubyte * n).from_address(c.data_ptr()) if n else bytearray()
            return _tensor_from_buffer, (pickle.PickleBuffer(raw), str(c.dtype)[6:], tuple(c.shape), obj.requires_grad)
        return NotImplemented


# One object = header | buffer table | pickle stream | out-of-band buffers, each buffer 64-byte aligned
# (vector loads). The same layout lives inline in a message or in an arena region.
#   header  = magic b"NRAYOBJ1" (8 bytes), number of buffers (u32), length of the pickle stream (u64)
#   table   = per buffer: (offset from the object's start, nbytes), u64 each
#   example: a 1 MB float32 array -> [20 B header][16 B table][121 B pickle][pad to 192][1,000,000 B of floats]
# The reader needs no other metadata: descriptor ("shm", offset, size) or ("inline", bytes) is enough.
_HDR, _BUF, _MAGIC = struct.Struct("<8sIQ"), struct.Struct("<QQ"), b"NRAYOBJ1"


_PLAIN = {type(None), bool, int, float, str, bytes}  # values that cannot hold refs, tensors or code


def _plain(value) -> bool:
    """A small value of scalars (and short lists/tuples/str-keyed dicts of them): safe for plain pickle."""
    t = type(value)
    return t in _PLAIN or (t in (list, tuple) and len(value) < 16 and all(_plain(v) for v in value)) or (
        t is dict and len(value) < 16 and all(type(k) is str and _plain(v) for k, v in value.items()))


def _dumps(value, what="a value"):
    """value -> (parts [(offset, bytes-like)], size, ids of contained refs, temporaries to keep alive)."""
    # the common small case (a task's arguments, None returned): the C pickler alone. _Pickler is C too, but
    # its reducer_override is a Python call per object, which dominates the cost of tiny messages.
    if _plain(value):
        data = pickle.dumps(value, protocol=5)
        return [(0, _HDR.pack(_MAGIC, 0, len(data))), (_HDR.size, data)], _HDR.size + len(data), [], None
    bufs, f = [], io.BytesIO()
    p = _Pickler(f, bufs)
    try:
        p.dump(value)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise TypeError(f"{what} cannot be sent to another process: {e}") from None
    data, raws = f.getbuffer(), [b.raw() for b in bufs]  # views: no byte is copied until the caller writes
    # lay the buffers out after the pickle stream, each at the next multiple of 64; pos ends as the total size
    pos = _HDR.size + _BUF.size * len(raws) + len(data)
    table = []
    for r in raws:
        pos = (pos + 63) & ~63
        table.append((pos, r.nbytes))
        pos += r.nbytes
    header = _HDR.pack(_MAGIC, len(raws), len(data)) + b"".join(_BUF.pack(o, n) for o, n in table)
    parts = [(0, header), (len(header), data)] + [(o, r) for (o, _), r in zip(table, raws)]
    return parts, pos, p.refs, p.keep


def _to_bytes(parts, size) -> bytes:
    """The layout as one bytes object (an inline object, a message payload); the gaps stay zero."""
    out = bytearray(size)
    for off, chunk in parts:
        out[off:off + len(chunk)] = chunk
    return bytes(out)


def _loads(mv):
    """An object from its layout. Buffers are slices of `mv`: writable views (a bytearray copy of a small
    object, a copy-on-write mapping of an arena region) so arrays and tensors come back writable."""
    magic, nbuf, plen = _HDR.unpack_from(mv, 0)
    if magic != _MAGIC:
        raise ObjectLostError("corrupt object: bad magic (the store was overwritten?)")
    pos, bufs = _HDR.size, []
    for _ in range(nbuf):
        off, n = _BUF.unpack_from(mv, pos)
        bufs.append(mv[off:off + n])  # a slice of a memoryview is a view: the arrays will point into mv
        pos += _BUF.size
    # FOOTGUN: unpickling runs code named in the stream (it imports modules, calls constructors): only ever
    # called on bytes from an authenticated peer or from our own store
    return pickle.loads(mv[pos:pos + plen], buffers=bufs)


def _bytes_of(value, what="a value") -> bytes:
    return _to_bytes(*_dumps(value, what)[:2])


def _error_desc(exc) -> tuple:
    """The descriptor of an object whose value is an error (raised by get)."""
    try:
        return ("error", _bytes_of(exc))
    except Exception:  # an unpicklable cause: keep the traceback text, drop the object
        return ("error", _bytes_of(RayTaskError(getattr(exc, "function_name", "?"), str(exc))))


# ---- wire: length-prefixed pickles after a mutual HMAC challenge ----------------------------------
# Unpickling is code execution, so nothing is unpickled from a peer before it proved the secret:
# server -> b"NRAY1" + nonce_s; client -> HMAC(secret, "C" + nonce_s) + nonce_c; server checks, then
# -> HMAC(secret, "S" + nonce_c); the client checks. Different role prefixes stop a reflection attack.
# This authenticates peers; it does not encrypt: across machines, use a trusted network (as with Ray).
#   Ray's processes speak gRPC (protobuf messages) to each other: a worker submits tasks straight to a worker
# leased from a raylet, and the control store (GCS) keeps cluster-wide tables (nodes, actors, jobs, groups).
# nanoray routes all control through the head: every process keeps ONE TCP connection to it, and every
# message is a frame = 4-byte little-endian length + a pickled tuple (op, ...). One hop more per task than
# Ray, but one place holds all state (no consistency protocol between schedulers), and TCP keeps each
# connection's messages in order, which the reference counting relies on (see _Client.send). The vocabulary:
#   any -> head     ("hello", info) first; ("refs", [(op, id)]) rides in front of the next message (+ - m u);
#                   ("rpc", req, name, args) -> ("reply", req, value or exception); name: the _rpc_* methods;
#                   ("get", req, ids, ack) -> ("objs", req, [(id, descriptor)]) as they get ready; ("unsub", req);
#                   ("put", id, descriptor, contained ids, hold); ("submit", task...); ("call", actor call...);
#                   ("pg", id, bundles, strategy, value, detached); ("rm_pg", id)
#   worker -> head  ("blocked", flag); ("done", task id, [(return id, descriptor, contained)], failed);
#                   ("created", actor id, (error descriptor, its text) or None)
#   raylet -> head  ("worker_exit", worker id, exit code); ("pulled", id, node id, offset, error or None)
#   head -> owner   ("objs", None, [(return id, descriptor or None)]): a task's results, pushed unasked
#   head -> worker  ("bind", sys.path); ("exec", ...); ("create", ...); ("call", ...)
#   head -> raylet  ("node", method, args): spawn, kill, pull, shutdown of _NodeManager
# A descriptor says where an object's bytes are: ("inline", bytes) | ("shm", offset, size) in the arena of the
# reader's node | ("error", bytes). Bulk data never crosses the head: an arena object moves between nodes on
# a connection of its own (_NodeManager.pull: handshake, 16 bytes (offset, size), then the raw region).

_LEN = struct.Struct("<I")


def _frame(msg) -> bytes:
    data = pickle.dumps(msg, protocol=5)
    return _LEN.pack(len(data)) + data


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _recv_exact(sock, n: int) -> bytes:
    """Exactly n bytes from a blocking socket (recv may return fewer); its timeout bounds each recv."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _auth_server(sock, secret: bytes) -> None:
    """The accepting side of the handshake; raises ConnectionError if the peer does not know the secret."""
    # a fresh random nonce per connection: a recorded reply from an earlier handshake is worthless
    nonce = os.urandom(32)
    sock.sendall(b"NRAY1" + nonce)
    reply = _recv_exact(sock, 64)
    if not hmac.compare_digest(reply[:32], _mac(secret, b"C", nonce)):
        raise ConnectionError("wrong secret (or not a nanoray peer)")
    sock.sendall(_mac(secret, b"S", reply[32:]))


def _auth_client(sock, secret: bytes) -> None:
    """The connecting side: answer the server's challenge, then make the server answer ours (both directions
    are checked, so a driver never unpickles the replies of an impostor head)."""
    hello = _recv_exact(sock, 37)
    if hello[:5] != b"NRAY1":
        raise ConnectionError("the server is not a nanoray node")
    mine = os.urandom(32)
    sock.sendall(_mac(secret, b"C", hello[5:]) + mine)
    try:
        proof = _recv_exact(sock, 32)
    except ConnectionError:
        raise ConnectionError("the node refused our secret (NANORAY_SECRET or the secret file differ)") from None
    if not hmac.compare_digest(proof, _mac(secret, b"S", mine)):
        raise ConnectionError("the node failed to prove the shared secret")


def _tune(sock) -> None:
    """Options for every TCP connection nanoray makes or accepts. Small messages: no Nagle delay. Keepalive:
    a peer that vanishes without a FIN or RST (a pulled cable, a frozen VM) would otherwise leave a recv
    waiting forever and its tasks never failed; the probes turn its silence into an error (~30 s) that the
    reader handles like an EOF. Ray gets the same from gRPC keepalives. Keepalive probes only an IDLE
    connection: a send whose data the vanished peer never acknowledges would retransmit for ~15 minutes, so
    TCP_USER_TIMEOUT caps unacknowledged data at the same 30 s. (The knobs are Linux names; other systems keep
    their defaults, often 2 hours of silence before the first probe.)"""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, every, count = KEEPALIVE
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", every), ("TCP_KEEPCNT", count),
                        ("TCP_USER_TIMEOUT", 1000 * (idle + every * count))):    # (the last one in ms)
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _connect(address: str, secret: bytes, timeout: float = 10.0) -> socket.socket:
    """An authenticated, blocking TCP socket to HOST:PORT; ConnectionError (with the address) if not."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r}: expected HOST:PORT")
    try:
        sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout)
    except OSError as e:
        raise ConnectionError(f"cannot reach a nanoray node at {address}: {e}") from None
    _tune(sock)
    try:
        _auth_client(sock, secret)
    except (OSError, ConnectionError) as e:
        sock.close()
        raise ConnectionError(f"{address}: {e}") from None
    sock.settimeout(None)  # the handshake had `timeout`; from now on the users of the socket set their own
    return sock


def _load_secret(path=None) -> bytes:
    """The cluster secret: $NANORAY_SECRET, else the file (--secret-file, $NANORAY_SECRET_FILE or
    ~/.nanoray/secret), which must be readable by its owner only."""
    if os.environ.get("NANORAY_SECRET"):
        return os.environ["NANORAY_SECRET"].encode()
    path = path or os.environ.get("NANORAY_SECRET_FILE") or SECRET_FILE
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no secret: set NANORAY_SECRET, or create {path} (mode 0600); "
                                f"`start --head` creates it") from None
    if st.st_mode & 0o077:
        raise PermissionError(f"the secret file {path} has mode {st.st_mode & 0o777:o}: it must be readable by "
                              f"its owner only (chmod 600 {path})")
    with open(path, "rb") as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError(f"the secret file {path} is empty")
    return secret


# ---- resources, the arena and its allocator -------------------------------------------------------
# Resources are pure bookkeeping, in Ray as here: a node advertises counts ({"CPU": 8, "GPU": 2, "reward":
# 4}), a task declares what it needs, and the scheduler subtracts while it runs. Nothing stops a num_cpus=1
# task from using every core; only GPUs are enforced, by giving the worker CUDA_VISIBLE_DEVICES = the devices
# it got. Counts are integers in 1/10000 units, so four num_gpus=0.25 tasks fill a device exactly.
#   The object store. Passing a 1 GB array through a socket costs pickle + send + receive + unpickle, and
# every reader pays again. Ray's answer (its "plasma" store, kept by the raylet) is one shared-memory area per
# node: a writer copies the object in once, readers map it and use it in place. Objects are immutable once
# sealed, which is what makes that safe without locks: nobody writes a region after its descriptor is
# published. nanoray keeps that design with the smallest parts: one sparse file in /dev/shm per node (the
# arena), which every process of the node maps, and a first-fit allocator that only the head runs. The head
# deals in offsets (pure bookkeeping); the bytes move between the writer's and the readers' mappings and never
# through the head. Drops: spilling to disk when full (a put that does not fit raises ObjectStoreFullError).

def _units(x, what: str) -> int:
    """A resource amount (1, 0.5, 2.25) as integer units; integers never drift the way 0.1 + 0.2 floats do."""
    if not isinstance(x, (int, float)) or x < 0:
        raise ValueError(f"{what}={x!r}: expected a number >= 0")
    return round(x * UNIT)


def _detect_gpus() -> list:
    """Physical GPU ids this node may use, without importing torch: CUDA_VISIBLE_DEVICES, else the
    driver's /proc entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def _node_gpus(declared=None) -> list:
    """The node's GPU ids: the detected ones, cut or padded to `declared` GPUs (a CPU box may pretend, for
    placement tests). Padding takes the smallest ids not already there, so the ids stay distinct even when
    CUDA_VISIBLE_DEVICES names a higher one (visible "1", 2 declared -> ["1", "0"], never ["1", "1"])."""
    gpus = _detect_gpus()
    if declared is None:
        return gpus
    spare = (str(i) for i in range(len(gpus) + declared) if str(i) not in gpus)
    return (gpus + [next(spare) for _ in range(declared - len(gpus))])[:declared]


class _Pool:
    """Free resources of a node or of a placement-group bundle, in units; GPUs also per device so a
    task gets device ids (num_gpus=0.5 shares a device, num_gpus=2 takes two whole ones)."""

    def __init__(self, free: dict, gpus: dict):
        self.free, self.gpus = dict(free), dict(gpus)  # resource -> units; gpu index -> free units

    def take(self, req: dict):
        """Allocate `req` -> (resources, {gpu index: units}), or None when it does not fit now. All or nothing:
        on None, the pool is unchanged. The pair is what give() takes back when the task ends."""
        if any(self.free.get(k, 0) < v for k, v in req.items()):
            return None
        g, ids = req.get("GPU", 0), {}
        if g and g <= UNIT:  # a fraction (or one): the fullest device that still fits (best fit)
            fits = [i for i, f in self.gpus.items() if f >= g]
            if not fits:
                return None
            ids = {min(fits, key=lambda i: self.gpus[i]): g}
        elif g:  # several whole devices (the lowest free indices; a partly used device never counts)
            whole = [i for i, f in sorted(self.gpus.items()) if f == UNIT][:g // UNIT]
            if len(whole) < g // UNIT:
                return None
            ids = {i: UNIT for i in whole}
        for k, v in req.items():
            self.free[k] -= v
        for i, u in ids.items():
            self.gpus[i] -= u
        return dict(req), ids

    def give(self, alloc) -> None:
        for k, v in alloc[0].items():
            self.free[k] = self.free.get(k, 0) + v
        for i, u in alloc[1].items():
            self.gpus[i] += u


class _Alloc:
    """First-fit allocator over one arena: a sorted free list of (offset, size), neighbours coalesced
    on free. Sizes are rounded up to pages so every region can be mapped on its own."""

    def __init__(self, size: int):
        self.size, self.free_list = size, [(0, size)]

    def alloc(self, n: int):
        """The offset of a free region of n bytes (rounded up to pages), or None when no hole is big enough:
        the store may have that much free in total, but fragmented."""
        n = -(-max(n, 1) // PAGE) * PAGE  # ceil(n / PAGE) pages
        for i, (off, size) in enumerate(self.free_list):
            if size >= n:
                self.free_list[i:i + 1] = [(off + n, size - n)] if size > n else []
                return off
        return None

    def free(self, off: int, n: int) -> None:
        """Give back the region at `off` of n bytes (the same n alloc got: it is rounded the same way)."""
        n = -(-max(n, 1) // PAGE) * PAGE
        fl = self.free_list
        # insert in offset order, then coalesce, so the list never holds two adjacent holes (O(holes) per call)
        i = next((k for k, (o, _) in enumerate(fl) if o > off), len(fl))
        fl.insert(i, (off, n))
        if i + 1 < len(fl) and off + n == fl[i + 1][0]:  # merge with the block after
            fl[i:i + 2] = [(off, n + fl[i + 1][1])]
        if i > 0 and fl[i - 1][0] + fl[i - 1][1] == off:  # and with the block before
            fl[i - 1:i + 1] = [(fl[i - 1][0], fl[i - 1][1] + fl[i][1])]

    def free_bytes(self) -> int:
        return sum(s for _, s in self.free_list)


class _Arena:
    """One node's object store: a sparse file in /dev/shm mapped once per process for writing (its
    pages stay mapped, so reusing a freed region copies at memcpy speed) and mapped per read,
    copy-on-write, so a reader's arrays view the store and the mapping's life tracks theirs."""

    def __init__(self, path: str, size: int, create: bool = False):
        # create: only the node manager, once (O_EXCL: never adopt a stale file); every other process opens it
        self.path, self.size = path, size
        self.fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        if create:
            os.ftruncate(self.fd, size)  # sparse: a page costs memory only once written
        self.map = mmap.mmap(self.fd, size)  # MAP_SHARED: what we write here, every process of the node sees
        self.mv = memoryview(self.map)

    def write(self, off: int, parts) -> None:
        for o, chunk in parts:
            self.mv[off + o:off + o + len(chunk)] = chunk  # the one copy of a put

    def view(self, off: int, size: int, on_unmap):
        """A writable memoryview of the region, through a private (copy-on-write) mapping of its own.
        Why private: numpy and torch need a writable buffer to give back writable arrays, and a reader that
        writes into its array must not change the object for everyone else. The kernel copies a page only
        when the reader writes it (FOOTGUN: writing a whole 1 GB array in place costs 1 GB of private RAM).
        Why a mapping per read: a private mapping still shows the FILE for the pages the reader did not
        write, so the region must not be reused while any reader maps it; one mapping per get lets
        `on_unmap` say exactly when this reader is done (the head counts "m"/"u" per region)."""
        base = off - off % PAGE  # mmap offsets must be page multiples (regions are: this is a safety net)
        m = mmap.mmap(self.fd, size + off - base, offset=base, access=mmap.ACCESS_COPY)
        weakref.finalize(m, on_unmap, off)  # runs when the last array/tensor viewing it is gone
        return memoryview(m)[off - base:off - base + size]

    def close(self) -> None:
        self.mv.release()
        self.map.close()
        os.close(self.fd)


# ---- client side: ObjectRef, the connection to the head, the public API ---------------------------
# Every process (driver, worker, raylet, the CLI) talks to the cluster through one _Client: one socket to the
# head, plus what the process knows locally. Three ideas carry this section.
#   Reference counting. Objects live in the head's memory or in shared memory, where no garbage collector
# can see them, so the cluster must learn when nobody needs an object any more. Ray makes the process that
# created a ref its *owner* (it counts the copies, including those lent to other processes, and its death
# loses what it owned). nanoray keeps one owner for everything, the head, and a two-level count: each process
# counts its own ObjectRef instances and tells the head only about the first ("+") and the last ("-"), so
# passing a ref around inside one process costs no message. Those reports are queued and ride in front of
# the next message the process sends (send), never alone.
# FOOTGUN: a process that drops its refs and then says nothing keeps those objects alive until it next sends
# (a worker always does, with "done"; an idle driver does at its next call).
#   Futures without a reader thread. A get() must block until the head says the object is ready, with other
# threads of the process possibly waiting for other things on the same socket. Whichever thread is waiting
# becomes the reader: it reads one message, files it (a reply, a descriptor, or work in the inbox), wakes
# everyone on the condition variable, and each waiter re-checks its own predicate (pump). A blocking get thus
# costs one send and one receive, with no hand-off between threads. Every wait has a deadline: gets may be
# bounded by the user (timeout=) and internal requests are bounded by RPC_TIMEOUT: nothing hangs forever.
#   Results are pushed. The head sends a task's result descriptors to the process that submitted it, unasked,
# so a get() on your own task's result sends nothing: it waits for a push that is already on its way.

_client = None  # this process's _Client once init() ran (or the worker/raylet connection)


def _need_client():
    if _client is None:
        raise RuntimeError("nanoray is not initialized: call nanoray.init() first")
    return _client


class ObjectRef:
    """A future for one object. Creating the first ref of an id in a process and dropping the last are
    reported to the head ("+"/"-"), which frees the object when no process holds it.
    A ref is only an id (a str); the value is fetched by get(). Ids are made by the submitting process
    (_Client.new_id: a random per-process prefix + a counter), so f.remote() returns at once, before the head
    has even read the submission."""
    __slots__ = ("_id", "__weakref__")

    def __init__(self, oid: str, _counted: bool = False):
        self._id = oid
        if _client is not None:
            _client.addref(oid, _counted)  # _counted: the head already counted this process

    def __del__(self):
        # FOOTGUN: __del__ runs whenever the last Python reference goes: on any thread, possibly while this
        # thread already holds ref_lock (a GC pass inside addref): hence an RLock, and no I/O here
        c = _client
        if c is not None:  # None: interpreter teardown, or a process without a cluster (the head)
            c.delref(self._id)

    def hex(self) -> str:
        return self._id

    def __eq__(self, other):
        return type(other) is ObjectRef and other._id == self._id

    def __hash__(self):
        return hash(self._id)

    def __repr__(self):
        return f"ObjectRef({self._id})"

    def __reduce__(self):  # unpickling makes a new ref: its process reports "+"
        return ObjectRef, (self._id,)

    def __await__(self):  # `await ref` in async actors: a blocking get on a helper thread
        import asyncio
        return asyncio.get_running_loop().run_in_executor(None, get, self).__await__()


class _Arg(str):
    """The id of a top-level ObjectRef argument: the worker replaces it by the object's value (nested
    refs, e.g. inside a list, arrive as refs: Ray's rule)."""


class _Client:
    """One process's connection to the head and its local state: ref counts, cached object descriptors,
    the arena. No reader thread: a thread that waits reads the socket itself ("caller pumps") and
    files what it reads for the others, so a synchronous call costs one send and one receive."""

    def __init__(self, address: str, secret: bytes, hello: dict):
        self.address, self.secret, self.sock = address, secret, _connect(address, secret)
        # send_lock: one frame at a time on the socket; ref_lock: counts and ops (held briefly, from any thread,
        # __del__ included); cond: guards `reading`; _file runs and waiters test their predicates under it
        self.send_lock, self.ref_lock, self.cond = threading.Lock(), threading.RLock(), threading.Condition()
        self.reading, self.rbuf, self.rpos = False, bytearray(), 0  # a thread is in _recv; bytes read, not parsed
        self.poller = select.poll()  # _recv's wait for bytes (poll: no FD_SETSIZE limit, unlike select)
        self.poller.register(self.sock, select.POLLIN)
        # inbox: work for this process (exec/call/create, raylet commands); replies: rpc req -> value;
        # descs: object id -> descriptor, for ids held here; acks: wait() requests the head has not answered yet
        self.inbox, self.replies, self.descs, self.acks = deque(), {}, {}, set()
        self.awaited = {0}  # rpc requests someone still waits for (0: hello's): _file keeps only their replies
        self.late = {}  # rpc requests given up on -> what to do with their reply when it comes (rpc's on_late)
        self.counts, self.ops, self.wanted = {}, [], Counter()  # wanted: ids fetched without a ref (task args)
        self.owned, self.elsewhere = set(), set()  # returns of our tasks, not pushed yet; pushed as "ask"
        self.ids, self.prefix = itertools.count(1), os.urandom(6).hex()  # request/id counter; our ids' prefix
        # in_task: a worker running a plain task (get() lends its CPU back); head_proc: the head init() started
        self.in_task, self.arena, self.head_proc = False, None, None
        try:
            self.send(("hello", hello))  # answered as request 0 (self.ids starts at 1)
            if not self.pump(lambda: 0 in self.replies, time.monotonic() + RPC_TIMEOUT):
                raise TimeoutError(f"the nanoray head at {address} did not answer hello")
            self.info = self._reply(0)
            self.awaited.discard(0)
        except BaseException:
            self.sock.close()
            raise

    def new_id(self) -> str:
        """A cluster-unique id with no round trip: 48 random bits for this process + a counter."""
        return f"{self.prefix}{next(self.ids):x}"

    # -- references: local counts, "+"/"-" and map/unmap reports queued and flushed with the next send
    def addref(self, oid, counted):
        """One more ObjectRef of oid in this process; the first one is reported unless the head counted it."""
        with self.ref_lock:
            n = self.counts.get(oid, 0)
            self.counts[oid] = n + 1
            if n == 0 and not counted:
                self.ops.append(("+", oid))

    def delref(self, oid):
        """One ObjectRef of oid fewer; at zero, forget its cached descriptor and report "-"."""
        with self.ref_lock:
            n = self.counts.get(oid)
            if n is None:
                return
            if n > 1:
                self.counts[oid] = n - 1
                return
            del self.counts[oid]
            self.descs.pop(oid, None)
            self.ops.append(("-", oid))

    def unmapped(self, off):
        """The mapping of the region at `off` died (called by a weakref finalizer, on any thread)."""
        with self.ref_lock:
            self.ops.append(("u", off))

    # -- the socket
    def send(self, msg) -> None:
        """Queued ref ops first, then msg, in ONE sendall. The order is the correctness argument of the
        reference counting: TCP delivers one connection's bytes in order and the head handles frames in that
        order, so (a) a "+" for a ref we unpickled from a task's arguments reaches the head before this
        worker's "done" unpins those arguments, and (b) a "-" for a ref we just passed to f.remote() is
        queued after the submit that pins it. The object can never be freed in between."""
        with self.send_lock:
            with self.ref_lock:  # taken inside send_lock: ops are drained in the order their frames go out
                ops, self.ops = self.ops, []
            data = (_frame(("refs", ops)) if ops else b"") + _frame(msg)
            try:
                self.sock.sendall(data)
            except OSError as e:
                raise RaySystemError(f"lost the connection to the nanoray head at {self.address}: {e}") from None

    def _recv(self, timeout):
        """The next message, or None when nothing complete arrived within timeout (None: wait forever).
        Only the thread that set self.reading calls this. Reads in 1 MiB chunks and parses frames out of
        rbuf, so one recv may deliver many small messages (the rest are served from rbuf, no syscall)."""
        while True:
            buf, pos = self.rbuf, self.rpos
            if len(buf) - pos >= 4:
                (n,) = _LEN.unpack_from(buf, pos)
                if len(buf) - pos - 4 >= n:
                    self.rpos = pos + 4 + n
                    if self.rpos == len(buf):
                        self.rbuf, self.rpos = bytearray(), 0
                    return pickle.loads(buf[pos + 4:pos + 4 + n])
            if pos > (1 << 20):  # compact now and then, not per message (that would be quadratic)
                del buf[:pos]
                self.rpos = 0
            # Wait with poll(), not sock.settimeout(): a socket has ONE timeout for both directions, and another
            # thread may be in sendall on it (a short get deadline here would time out its send). The socket stays
            # blocking; after POLLIN, recv returns what has arrived without waiting.
            if timeout is not None and not self.poller.poll(max(timeout, 0.0) * 1000):
                return None
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:  # EOF (or a reset): the head is gone; every waiter sees this error in turn
                raise RaySystemError(f"lost the connection to the nanoray head at {self.address}")
            self.rbuf += chunk

    def pump(self, done, deadline=None) -> bool:
        """Read and file messages until done() (True) or the deadline (False).
        done() is checked under self.cond, so it may read what _file writes. At most one thread reads the
        socket at a time; the others sleep on the condition and re-check after every filed message (and at
        least every second, so a waiter with a deadline notices it even if the reader sleeps forever)."""
        drained = False
        while True:
            with self.cond:
                if done():
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    # Past the deadline, still file what has ALREADY arrived (a 1 us poll per message) before
                    # giving up: wait(timeout=0) must see a task that finished long ago, whose result sits
                    # unread in the socket.
                    if drained or self.reading:
                        return False
                    left = 1e-6
                if self.reading:  # another thread reads for us and notifies
                    self.cond.wait(1.0 if left is None else min(left, 1.0))
                    continue
                self.reading = True
            msg = None
            try:  # outside the lock: the other threads may send, and check their predicates, meanwhile
                msg = self._recv(left)
                drained = msg is None  # (a timed-out read: nothing complete is waiting)
            finally:
                with self.cond:
                    self.reading = False
                    if msg is not None:
                        self._file(msg)
                    self.cond.notify_all()  # on errors too: another waiter takes over the reading (or fails)

    def _file(self, msg):
        """Put one message where its waiter looks (called under self.cond)."""
        if msg[0] == "objs":  # descriptors: answers to a get, or the results of tasks we submitted
            for oid, d in msg[2]:
                self.owned.discard(oid)
                if d is None:  # ready, but not readable here (another node's arena): get() asks
                    self.elsewhere.add(oid)
                elif oid in self.counts or self.wanted[oid] > 0:  # else nobody here cares any more: drop it
                    self.descs[oid] = d
            self.acks.discard(msg[1])  # (kept for no other request: a late answer leaves nothing behind)
        elif msg[0] == "reply":
            if msg[1] in self.awaited:  # else its caller gave up (a timeout, a Ctrl-C): nobody would ever pop it
                self.replies[msg[1]] = msg[2]
            elif msg[1] in self.late:
                self.late.pop(msg[1])(msg[2])
        else:  # work for a worker, commands for a raylet
            self.inbox.append(msg)

    def next_message(self, timeout=None):
        """The next inbox message (work for a worker, a command for a raylet), or None after timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.inbox.popleft() if self.pump(lambda: self.inbox, deadline) else None

    def _reply(self, req):
        """The reply to request req; an exception the head caught in the handler is raised here."""
        v = self.replies.pop(req)
        if isinstance(v, BaseException):
            raise v
        return v

    def rpc(self, name, *args, timeout=RPC_TIMEOUT, on_late=None):
        """Call the head's _rpc_<name>(peer, *args) and return its value: one round trip, bounded.
        on_late(value) undoes what the head did for a call we gave up on, when its reply comes (or came) anyway
        (under self.cond: no I/O in it)."""
        req, ok = next(self.ids), False
        with self.cond:
            self.awaited.add(req)
        try:
            self.send(("rpc", req, name, args))
            ok = self.pump(lambda: req in self.replies, time.monotonic() + timeout)
        finally:
            with self.cond:  # (under cond: _file may be filing this very reply on another thread)
                self.awaited.discard(req)
                if not ok and req in self.replies:  # gave up, yet the reply came meanwhile
                    v = self.replies.pop(req)
                    if on_late is not None:
                        on_late(v)
                elif not ok and on_late is not None:  # a later reply goes to on_late, then is dropped (_file)
                    self.late[req] = on_late
        if not ok:
            raise TimeoutError(f"the nanoray head at {self.address} did not answer {name!r} within {timeout:.0f} s")
        return self._reply(req)

    # -- objects
    def fetch(self, ids, timeout=None):
        """Descriptors of `ids`, waiting until they are ready (and local) or raising GetTimeoutError.
        The steps: ids already in descs cost nothing; the others are marked wanted (so _file keeps their
        descriptors even without a ref here: a task's arguments) and asked for with one "get", except our own
        task results, which the head pushes anyway. Then pump until all arrived. A push or answer with no
        descriptor means "ready, but in another node's arena": those are asked for again, and the head copies
        them here first (_pull) before it answers. On timeout, "unsub" tells the head to forget this request."""
        missing = [i for i in ids if i not in self.descs]
        if missing:
            deadline = None if timeout is None else time.monotonic() + timeout
            req = next(self.ids)
            with self.cond:  # wanted is shared by the threads of a threaded actor and read by _file (under cond)
                self.wanted.update(missing)
            ask = [i for i in missing if i not in self.owned]  # our own task results are pushed anyway
            if ask:
                self.send(("get", req, ask, False))
            pending = missing[::-1]  # reversed: pop() from the end as they arrive, in order, O(1) each

            def done():  # (under self.cond) all arrived, or some arrived as "elsewhere" and must be asked for
                while pending and pending[-1] in self.descs:
                    pending.pop()
                return not pending or bool(self.elsewhere)
            # pump with a deadline of now = a check that waits for nothing (it files what has already arrived):
            # only a task that will really wait says so
            blocked = self.in_task and not self.pump(done, time.monotonic())
            # a task waiting in get lends its CPU back, so nested tasks can run: without it, N tasks that each
            # wait for a child fill N CPUs and the children never start (Ray releases the CPU the same way)
            if blocked:
                self.send(("blocked", True))
            try:
                while True:
                    ok = self.pump(done, deadline)
                    with self.cond:  # take the "elsewhere" ids (any thread's) that someone here still wants
                        there, self.elsewhere = [i for i in self.elsewhere if self.wanted[i] > 0], set()
                    if there:  # the head answers on req, but _file stores descriptors for every waiting thread
                        self.send(("get", req, there, False))
                    if not ok or not pending:
                        break
            finally:  # also on timeout and errors: the CPU is taken back before the task goes on
                if blocked:
                    self.send(("blocked", False))
                with self.cond:
                    self.wanted.subtract(missing)
            if not ok:
                self.send(("unsub", req))
                raise GetTimeoutError(f"get timed out after {timeout} s: {len(pending)} of {len(ids)} objects "
                                      f"not ready")
        with self.cond:
            out = [self.descs[i] for i in ids]
            for i in missing:  # not ours to cache (no ref here), unless another thread still waits for it
                if i not in self.counts and self.wanted[i] <= 0:
                    self.descs.pop(i, None)
                    del self.wanted[i]
        return out

    def value(self, desc):
        """The value a descriptor stands for; raises when it is an error. Inline bytes are copied into a
        bytearray (a writable buffer: arrays come back writable); arena objects are mapped, not copied."""
        kind = desc[0]
        if kind == "inline":
            return _loads(memoryview(bytearray(desc[1])))
        if kind == "shm":
            # "m" is queued BEFORE the mapping exists and "u" only when it dies, so the head can never count
            # this mapping as gone while it lives. The region stays allocated meanwhile: we hold a ref (or, for
            # a task argument, the task pins it until our "done", which is sent after this "m")
            with self.ref_lock:
                self.ops.append(("m", desc[1]))
            return _loads(self.get_arena().view(desc[1], desc[2], self.unmapped))
        err = _loads(memoryview(bytearray(desc[1])))
        raise err.as_instanceof_cause() if isinstance(err, RayTaskError) else err

    def get_arena(self):
        """This node's arena, opened on first use (a driver that only moves small objects never maps it)."""
        if self.arena is None:
            self.arena = _Arena(self.info["arena"], self.info["arena_size"])
        return self.arena

    def store(self, value):
        """value -> (descriptor, contained ref ids): inline when small, else a region of the arena."""
        parts, size, refs, _keep = _dumps(value)  # _keep: tensor copies the parts point into, alive until written
        if size <= INLINE_MAX:
            return ("inline", _to_bytes(parts, size)), refs
        # the head owns the allocator of every arena (one allocator, no cross-process lock): one round trip per
        # large object. Until the caller's "put"/"done" seals it, the region belongs to this connection, so a
        # process that dies mid-write gives it back (_Head._close)
        off = self.rpc("alloc", size)
        try:
            self.get_arena().write(off, parts)
        except BaseException:   # (a Ctrl-C mid-copy too) the region would stay this connection's until it closes
            self.send(("unalloc", [off]))
            raise
        return ("shm", off, size), refs

    def pack_args(self, args, kwargs, what="the call"):
        """(args, kwargs) -> (payload, deps, contained) for a submit: payload is the pickled (args, kwargs)
        with each top-level ObjectRef replaced by an _Arg (resolved to its value by the worker), or, above
        INLINE_MAX, the id of an object holding them; deps lists the ids the task must wait for (top-level
        refs, + that object); contained lists refs nested deeper (pinned, passed on as refs)."""
        deps = []

        def mark(x):
            if type(x) is ObjectRef:
                deps.append(x._id)
                return _Arg(x._id)
            return x
        payload = ([mark(a) for a in args], {k: mark(v) for k, v in kwargs.items()})
        parts, size, refs, _keep = _dumps(payload, f"an argument of {what}")
        if size <= INLINE_MAX:
            return _to_bytes(parts, size), deps, refs
        oid = self.new_id()  # large arguments become an object of their own, pinned by the task
        desc, refs = self.store(payload)  # (pickles the payload a second time: the cost of a simple path)
        # hold=False: no process holds it; the "submit" that follows on this connection pins it, and when the
        # task ends and unpins it, it is freed
        self.send(("put", oid, desc, refs, False))
        return oid, deps + [oid], []

    def resolve_args(self, args, deps):
        """(args, kwargs) of a task, top-level refs replaced by their values. deps: [(id, descriptor or
        None)] as the head sent them, with the descriptors it already knew for this node (no round trip)."""
        descs = dict(deps)
        need = [d for d, v in descs.items() if v is None]  # not on this node (or not inline): fetch
        descs.update(zip(need, self.fetch(need)))
        a, kw = self.value(descs[args]) if isinstance(args, str) else _loads(memoryview(bytearray(args)))
        val = lambda x: self.value(descs[x]) if type(x) is _Arg else x  # noqa: E731
        return [val(x) for x in a], {k: val(v) for k, v in kw.items()}


# ---- public API ------------------------------------------------------------------------------------
# Ray's names and signatures, thin: each function checks its arguments (errors name the argument and what
# was expected), turns them into one message for the head, and returns. Nothing here decides where or when
# anything runs: submit returns ObjectRefs at once (ids are made locally) and the head schedules later;
# get/wait block in _Client.fetch/pump. The options of @remote are validated once, at decoration, into what
# the head needs (_head_options: integer resource units, an encoded strategy), so a bad num_gpus fails at the
# definition, not in a worker an hour later. Functions and classes are pickled on their first .remote() and
# cached (FOOTGUN: a change to a global they use, made in the driver after that, never reaches the workers).

_IGNORED_INIT = {"include_dashboard", "dashboard_host", "dashboard_port", "logging_level", "log_to_driver",
                 "configure_logging"}  # Ray's cosmetic init options: accepted, without effect


def init(address=None, *, num_cpus=None, num_gpus=None, resources=None, object_store_memory=None,
         namespace=None, ignore_reinit_error=False, **kwargs):
    """Start a local cluster (head + workers in fresh processes), or join one: address="HOST:PORT",
    "auto" (the head started on this machine by `start`), or $NANORAY_ADDRESS."""
    global _client
    unknown = set(kwargs) - _IGNORED_INIT
    if unknown:
        raise ValueError(f"init(): unsupported argument(s) {sorted(unknown)} (nanoray keeps a subset of ray.init)")
    if _client is not None:
        if ignore_reinit_error:
            return _client.info
        raise RuntimeError("Maybe you called nanoray.init twice by accident? Pass ignore_reinit_error=True.")
    # (a process started from inside a task inherits NANORAY_ADDRESS and the secret: its init() joins our cluster)
    address = address or os.environ.get("NANORAY_ADDRESS")
    hello = {"kind": "driver", "pid": os.getpid(), "host": socket.gethostname(), "sys_path": sys.path,
             "namespace": namespace}
    if address:
        if num_cpus is not None or num_gpus is not None or resources or object_store_memory:
            raise ValueError("init(address=...): num_cpus, num_gpus, resources and object_store_memory belong "
                             "to `python nanoray.py start`, not to a driver joining a cluster")
        if address == "auto":
            address = _local_head_address()
        _client = _Client(address, _load_secret(), hello)
    else:  # a private cluster for this driver: a random secret, a head on loopback that dies with us
        secret = os.urandom(16).hex()
        # the driver binds the port and hands the listening socket to the head (pass_fds): the address is known
        # before the head runs, and connect() just waits in the backlog until the head accepts: no port file,
        # no polling, no race for a free port
        listen = socket.create_server(("127.0.0.1", 0))
        cfg = {"head": True, "listen_fd": listen.fileno(), "lifeline": True, "num_cpus": num_cpus,
               "num_gpus": num_gpus, "resources": resources or {}, "object_store_memory": object_store_memory}
        env = dict(os.environ, NANORAY_SECRET=secret, NANORAY_CONFIG=json.dumps(cfg))
        # stdin=PIPE is the lifeline (the head stops at its EOF: we died); a session of its own keeps a Ctrl-C
        # in the terminal from reaching the head and workers: the driver's atexit shutdown stops them in order
        proc = subprocess.Popen([sys.executable, "-c", _boot("_node_main")], env=env, stdin=subprocess.PIPE,
                                pass_fds=(listen.fileno(),), start_new_session=True)
        address = "127.0.0.1:%d" % listen.getsockname()[1]
        listen.close()  # the head holds its own copy of the listening socket
        try:
            _client = _Client(address, secret.encode(), hello)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        _client.head_proc = proc
    return _client.info


def shutdown() -> None:
    """Disconnect; a cluster this process started is stopped (workers killed, the arena removed)."""
    global _client
    c, _client = _client, None  # first: ObjectRefs dying from here on report nothing
    if c is None:
        return
    if c.head_proc is not None:
        with suppress(RayError, OSError):  # (the head is gone already: its janitor removes the arena)
            c.rpc("shutdown", timeout=10)
    c.sock.close()
    if c.arena is not None:  # its fd too: an open fd keeps an unlinked arena's pages in RAM until we exit
        c.arena.close()  # (arrays still viewing the arena keep their own mappings, with their own fds)
    if c.head_proc is not None:
        try:
            c.head_proc.wait(10)
        except subprocess.TimeoutExpired:
            c.head_proc.kill()
            c.head_proc.wait()


atexit.register(shutdown)  # a driver that forgets shutdown() still stops the cluster it started


def is_initialized() -> bool:
    return _client is not None


def get(object_refs, *, timeout=None):
    """The value of one ref or a list of refs; raises the task's error, or GetTimeoutError."""
    single = type(object_refs) is ObjectRef
    refs = [object_refs] if single else object_refs
    if not isinstance(refs, (list, tuple)) or any(type(r) is not ObjectRef for r in refs):
        raise TypeError(f"get() expects an ObjectRef or a list of ObjectRefs, got {type(object_refs).__name__}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"get(timeout={timeout}): expected None or >= 0")
    c = _need_client()
    # all descriptors first, then the values: a list waits once, and the first error (in list order) raises
    # only after every object of the list is ready
    values = [c.value(d) for d in c.fetch([r._id for r in refs], timeout)]
    return values[0] if single else values


def put(value) -> ObjectRef:
    """Store value in the cluster and return its ref: small values go inline to the head, large ones are
    copied once into this node's arena. The head counts this process as a holder from the start (hold=True)."""
    if type(value) is ObjectRef:
        raise TypeError("Calling 'put' on an ObjectRef is not allowed (wrap it in a list to store it)")
    c = _need_client()
    oid = c.new_id()
    desc, refs = c.store(value)
    c.send(("put", oid, desc, refs, True))
    c.descs[oid] = desc  # our own put: get() needs no round trip
    return ObjectRef(oid, _counted=True)


def wait(object_refs, *, num_returns=1, timeout=None, fetch_local=True):
    """(ready, not_ready): the first num_returns refs that are ready (and local), in input order.
    fetch_local is accepted for Ray's signature; objects on another node are always copied here first."""
    refs = list(object_refs)
    if any(type(r) is not ObjectRef for r in refs):
        raise TypeError("wait() expects a list of ObjectRefs")
    if len(set(refs)) != len(refs):
        raise ValueError("Wait requires a list of unique object refs.")
    if not 0 <= num_returns <= len(refs):
        raise ValueError(f"wait(num_returns={num_returns}): expected 0..{len(refs)} (the number of refs)")
    c = _need_client()
    missing = [r._id for r in refs if r._id not in c.descs]  # ready = its descriptor is cached here
    if missing and num_returns > len(refs) - len(missing):  # not enough ready yet: ask the head
        req = next(c.ids)
        # ack=True: the head answers at once, even with an empty list, so "req not in acks" means "the head has
        # told us everything that was ready when it read the request" (not just the first push to arrive)
        c.acks.add(req)
        c.send(("get", req, missing, True))
        deadline = None if timeout is None else time.monotonic() + timeout
        # enough = num_returns minus those already ready before the request
        # timeout=0: pump still files the messages already in the socket (results pushed to us earlier), so a
        # task that finished before this call is ready even though the head's answer to this request is not
        c.pump(lambda: req not in c.acks and sum(i in c.descs for i in missing) >= num_returns - len(refs)
               + len(missing), deadline)
        c.send(("unsub", req))  # the objects still pending stop waking us (their descriptors would be stale work)
        c.acks.discard(req)
    ready = [r for r in refs if r._id in c.descs][:num_returns]
    taken = set(ready)
    return ready, [r for r in refs if r not in taken]


def kill(actor, *, no_restart=True) -> None:
    """Kill the actor's process now (running calls fail). no_restart=False lets it restart if it may."""
    if not isinstance(actor, ActorHandle):
        raise ValueError(f"kill() only supports actors, got {type(actor).__name__}")
    _need_client().rpc("kill", actor._aid, no_restart)


def _drop_handle(reply) -> None:
    """rpc's on_late for create_actor and get_actor: the head counted us as holding the actor it names."""
    if isinstance(reply, (str, tuple)):  # (an exception: it counted nothing)
        ObjectRef(reply if isinstance(reply, str) else reply[0], _counted=True)  # made and dropped: "-"


def get_actor(name: str, namespace=None):
    """A handle to a live named actor (namespace: the caller's job's unless given)."""
    aid, cls_name, methods = _need_client().rpc("get_actor", name, namespace, on_late=_drop_handle)
    return ActorHandle(aid, cls_name, methods, ObjectRef(aid, _counted=True))


def cluster_resources() -> dict:
    return _need_client().rpc("resources", "total")


def available_resources() -> dict:
    """What is free now on the live nodes (resources inside placement-group bundles count as used)."""
    return _need_client().rpc("resources", "free")


def nodes() -> list:
    return _need_client().rpc("nodes")


def get_gpu_ids() -> list:
    """Physical GPU ids assigned to this worker (empty in a driver)."""
    return [int(g) if g.isdigit() else g for g in os.environ.get("NANORAY_GPU_IDS", "").split(",") if g]


# the defaults (Ray's, but for actor CPUs: see the module docstring): a task holds 1 CPU and is retried 3 times
# if its worker dies; an actor holds 0 CPUs (it is mostly idle between calls) and never restarts unless asked
_TASK_OPTIONS = {"num_cpus": 1, "num_gpus": 0, "resources": None, "max_retries": 3, "retry_exceptions": False,
                 "num_returns": 1, "scheduling_strategy": None, "name": None}
_ACTOR_OPTIONS = {"num_cpus": 0, "num_gpus": 0, "resources": None, "max_restarts": 0, "max_task_retries": 0,
                  "max_concurrency": None, "name": None, "namespace": None, "lifetime": None,
                  "scheduling_strategy": None, "get_if_exists": False}


def _head_options(opts: dict, defaults: dict, what: str) -> dict:
    """User options -> what the head needs: resource units, an encoded strategy, the rest checked."""
    bad = set(opts) - set(defaults)
    if bad:
        raise ValueError(f"{what}: unknown option(s) {sorted(bad)}; nanoray supports {sorted(defaults)}")
    o = {**defaults, **{k: v for k, v in opts.items() if v is not None}}
    req = {"CPU": _units(o["num_cpus"], "num_cpus"), "GPU": _units(o["num_gpus"], "num_gpus")}
    if req["GPU"] > UNIT and req["GPU"] % UNIT:
        raise ValueError(f"{what}: num_gpus={o['num_gpus']}: a request above one GPU must be a whole number")
    for k, v in (o["resources"] or {}).items():
        if k in ("CPU", "GPU"):
            raise ValueError(f"{what}: use num_cpus / num_gpus, not resources={{{k!r}: ...}}")
        req[k] = _units(v, f"resources[{k!r}]")
    # the strategy as the head stores it: None (default: the submitter's node first), "SPREAD" (round robin
    # over nodes), or ("pg", group id, bundle index; -1 = any bundle of the group)
    s = o["scheduling_strategy"]
    if isinstance(s, PlacementGroupSchedulingStrategy):
        pg, i = s.placement_group, s.placement_group_bundle_index
        if not -1 <= i < len(pg.bundle_specs):
            raise ValueError(f"{what}: placement_group_bundle_index={i}, the group has {len(pg.bundle_specs)} bundles")
        s = ("pg", pg.id, i)
    elif s not in (None, "DEFAULT", "SPREAD"):
        raise ValueError(f"{what}: scheduling_strategy={s!r}: expected 'DEFAULT', 'SPREAD' or a "
                         f"PlacementGroupSchedulingStrategy")
    o["req"], o["strategy"] = {k: v for k, v in req.items() if v}, None if s == "DEFAULT" else s
    r = o.get("retry_exceptions")   # a list of exception classes: the worker matches them (the head may not
    if isinstance(r, (list, tuple)):  # import the user's classes), so they travel pickled by our pickler
        if not all(isinstance(x, type) and issubclass(x, BaseException) for x in r):
            raise ValueError(f"{what}: retry_exceptions={r!r}: expected a bool or a list of exception classes")
        o["retry_exceptions"], o["retry_on"] = bool(r), _bytes_of(tuple(r), f"{what}'s retry_exceptions")
    if not isinstance(o.get("num_returns", 1), int) or o.get("num_returns", 1) < 1:
        raise ValueError(f"{what}: num_returns={o['num_returns']}: expected an int >= 1")
    del o["scheduling_strategy"], o["resources"]
    return o


class RemoteFunction:
    """f.remote(*args) submits a task and returns an ObjectRef (a list of them for num_returns > 1)."""

    def __init__(self, function, options, _shared=None):
        self._function, self._options = function, options
        self._opts = _head_options(options, _TASK_OPTIONS, f"remote function {function.__qualname__}")
        self._shared = {} if _shared is None else _shared  # the pickled function, shared by .options() copies
        self.__name__, self.__doc__ = function.__name__, function.__doc__

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Remote functions cannot be called directly. Instead of running '{self.__name__}()', "
                        f"try '{self.__name__}.remote()'.")

    def options(self, **options):
        return RemoteFunction(self._function, {**self._options, **options}, self._shared)

    def __getstate__(self):  # a remote function passed to a task (nested submission): its function + options only
        return {"_function": self._function, "_options": self._options}

    def __setstate__(self, d):
        self.__init__(d["_function"], d["_options"])

    def remote(self, *args, **kwargs):
        """Submit one task: no round trip. The function is pickled once per process and the same bytes are
        sent with every call (the worker keeps the loaded function per distinct bytes, so it unpickles once)."""
        c, o = _need_client(), self._opts
        blob = self._shared.get("blob") or self._shared.setdefault(
            "blob", _bytes_of(self._function, f"remote function {self.__name__} (or a global it uses)"))
        tid, rids = c.new_id(), [c.new_id() for _ in range(o["num_returns"])]
        args_blob, deps, contained = c.pack_args(args, kwargs, f"{self.__name__}.remote()")
        c.owned.update(rids)  # before the send: the push of a fast result can never beat this line
        c.send(("submit", tid, blob, o["name"] or self._function.__qualname__, args_blob, deps, contained, rids,
                {k: o.get(k) for k in ("req", "strategy", "max_retries", "retry_exceptions", "retry_on")}))
        # _counted: the head makes the submitter a holder of each return when it admits the task (_admit)
        refs = [ObjectRef(r, _counted=True) for r in rids]
        return refs[0] if len(refs) == 1 else refs


class ActorClass:
    """A.remote(*args) starts an actor (a dedicated worker process) and returns its ActorHandle."""

    def __init__(self, cls, options, _shared=None):
        self._cls, self._options = cls, options
        self._opts = _head_options(options, _ACTOR_OPTIONS, f"actor class {cls.__qualname__}")
        self._shared = {} if _shared is None else _shared
        # the method table travels with every handle, so handle.method checks names locally (no round trip);
        # dunder methods are not callable remotely
        funcs = inspect.getmembers(cls, inspect.isfunction)
        self._methods = {n: getattr(f, "__nanoray_num_returns__", 1) for n, f in funcs if not n.startswith("__")}
        self._is_async = any(inspect.iscoroutinefunction(f) for _, f in funcs)

    def __call__(self, *args, **kwargs):
        name = self._cls.__name__
        raise TypeError(f"Actors cannot be instantiated directly. Instead of '{name}()', use '{name}.remote()'.")

    def options(self, **options):
        return ActorClass(self._cls, {**self._options, **options}, self._shared)

    def remote(self, *args, **kwargs):
        c, o = _need_client(), self._opts
        blob = self._shared.get("blob") or self._shared.setdefault(
            "blob", _bytes_of(self._cls, f"actor class {self._cls.__name__} (or a global it uses)"))
        if o["lifetime"] not in (None, "detached"):
            raise ValueError(f"lifetime={o['lifetime']!r}: expected None or 'detached'")
        conc = o["max_concurrency"] or (1000 if self._is_async else 1)  # Ray's defaults
        hopts = {"req": o["req"], "strategy": o["strategy"], "max_restarts": o["max_restarts"],
                 "max_task_retries": o["max_task_retries"], "max_concurrency": conc, "is_async": self._is_async,
                 "name": o["name"], "namespace": o["namespace"], "detached": o["lifetime"] == "detached",
                 "get_if_exists": o["get_if_exists"]}
        args_blob, deps, contained = c.pack_args(args, kwargs, f"{self._cls.__name__}.remote()")
        # an rpc, not a plain send like tasks: a taken name must raise here, and get_if_exists may return
        # another actor's id. The constructor itself runs later: its errors surface at the first call.
        # If we give up waiting (a timeout, a Ctrl-C), the head still creates the actor (or, for get_if_exists,
        # finds the existing one: another id), counting us as the holder of a handle we never got: when its
        # answer comes, a ref of the id it names, made and dropped at once, tells it "-"
        aid = c.rpc("create_actor", c.new_id(), blob, self._cls.__name__, args_blob, deps, contained, hopts,
                    self._methods, on_late=_drop_handle)
        return ActorHandle(aid, self._cls.__name__, self._methods, ObjectRef(aid, _counted=True))


class ActorHandle:
    """handle.method.remote(*args) -> ObjectRef. Handles can be passed to tasks and other actors; a
    non-detached actor ends when the last handle anywhere is gone.
    The trick: a handle owns an ObjectRef whose id is the actor id. The head keeps an object for it (_Obj
    with .actor set), so handles are counted by the same "+"/"-" machinery as objects, across processes,
    and when that object is freed the actor exits once its queued calls are done (_maybe_free)."""

    def __init__(self, aid, cls_name, methods, ref):
        self._aid, self._cls_name, self._methods, self._ref = aid, cls_name, methods, ref

    def __getattr__(self, name):
        if name.startswith("__") or name not in self._methods:
            raise AttributeError(f"'{self.__dict__.get('_cls_name')}' actor has no method '{name}'")
        return ActorMethod(self, name, self._methods[name])

    def __repr__(self):
        return f"Actor({self._cls_name}, {self._aid})"


class ActorMethod:
    """handle.method: .remote(*args) sends one call; .options(num_returns=) overrides the decorator's."""

    def __init__(self, handle, name, num_returns):
        self._handle, self._name, self._num_returns = handle, name, num_returns

    def __call__(self, *args, **kwargs):
        raise TypeError(f"Actor methods cannot be called directly. Instead of running 'object.{self._name}()', "
                        f"try 'object.{self._name}.remote()'.")

    def options(self, *, num_returns=None):
        return ActorMethod(self._handle, self._name, num_returns or self._num_returns)

    def remote(self, *args, **kwargs):
        c = _need_client()
        tid, rids = c.new_id(), [c.new_id() for _ in range(self._num_returns)]
        args_blob, deps, contained = c.pack_args(args, kwargs, f"{self._name}.remote()")
        c.owned.update(rids)
        # calls from one process go out in program order on one connection and the head queues them per actor
        # in arrival order: an actor gets one caller's calls in the order they were made (and, with
        # max_concurrency=1, runs them in that order)
        c.send(("call", tid, self._handle._aid, self._name, args_blob, deps, contained, rids))
        refs = [ObjectRef(r, _counted=True) for r in rids]
        return refs[0] if len(refs) == 1 else refs


def remote(*args, **options):
    """@remote or @remote(num_cpus=..., ...) on a function (-> RemoteFunction) or a class (-> ActorClass)."""
    def make(obj):
        return ActorClass(obj, options) if inspect.isclass(obj) else RemoteFunction(obj, options)
    if len(args) == 1 and not options and callable(args[0]):
        return make(args[0])
    if args:
        raise TypeError("@remote takes no positional arguments: use @remote or @remote(num_cpus=1, ...)")
    return make


def method(*, num_returns=1):
    """@method(num_returns=2) on an actor method."""
    def deco(f):
        f.__nanoray_num_returns__ = num_returns
        return f
    return deco


class PlacementGroup:
    """Reserved bundles of resources. ready() -> an ObjectRef that resolves once they are placed.
    Why reserve: a torchrun-style job needs ALL its W ranks running at once; started one by one, two jobs can
    each get half their GPUs and wait for each other forever. A group is placed all at once or not at all
    (gang scheduling), then tasks and actors are started inside its bundles. In Ray the control store runs a
    two-phase commit with the raylets to reserve the bundles; with one head holding every pool, nanoray's
    reservation is a single function call (_Head._place_pg).
    bundle_specs: the bundles as given, e.g. [{"CPU": 1, "GPU": 1}] * 4; id: made here, like object ids."""

    def __init__(self, pg_id, bundle_specs, strategy):
        self.id, self.bundle_specs, self.strategy = pg_id, bundle_specs, strategy

    @property
    def bundle_count(self):
        return len(self.bundle_specs)

    def ready(self) -> ObjectRef:
        # an object the head made with the group (pinned while the group lives) and seals with this
        # PlacementGroup as its value once every bundle is reserved: get() on it is the wait
        return ObjectRef(self.id + ".ready")

    def wait(self, timeout_seconds=30) -> bool:
        try:
            get(self.ready(), timeout=timeout_seconds)
            return True
        except GetTimeoutError:
            return False


class PlacementGroupSchedulingStrategy:
    """scheduling_strategy= for a task or actor: run in bundle `placement_group_bundle_index` of the group
    (-1: any bundle with room). Its resources come out of the bundle, not out of the node's free pool.
    capture_child_tasks is accepted for Ray's signature and ignored: children schedule normally."""

    def __init__(self, placement_group, placement_group_bundle_index=-1, placement_group_capture_child_tasks=None):
        self.placement_group, self.placement_group_bundle_index = placement_group, placement_group_bundle_index
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks


def placement_group(bundles, strategy="PACK", name="", lifetime=None) -> PlacementGroup:
    """Ask the head to reserve `bundles` (a list of resource dicts) with a strategy: PACK (as few nodes as
    possible), SPREAD (as many as possible), STRICT_PACK (one node, or wait), STRICT_SPREAD (one node per
    bundle, or wait). Returns at once; pg.ready() resolves when reserved. name is accepted and unused;
    lifetime="detached" keeps the group after this driver exits."""
    if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(f"placement_group(strategy={strategy!r}): expected PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    if not bundles or not all(isinstance(b, dict) and b for b in bundles):
        raise ValueError("placement_group(bundles=...): expected a non-empty list of non-empty resource dicts")
    c = _need_client()
    units = [{k: _units(v, f"bundle {i} {k}") for k, v in b.items()} for i, b in enumerate(bundles)]
    if any(b.get("GPU", 0) > UNIT and b["GPU"] % UNIT for b in units):
        raise ValueError("placement_group: a bundle asking for more than one GPU must ask for a whole number")
    pg = PlacementGroup(c.new_id(), [dict(b) for b in bundles], strategy)
    # the pickled group travels along: it is the value that pg.ready() resolves to, in any process
    c.send(("pg", pg.id, units, strategy, _bytes_of(pg), lifetime == "detached"))
    return pg


def remove_placement_group(placement_group) -> None:
    """Give the bundles back; actors and running tasks placed in the group are killed (as Ray does)."""
    _need_client().send(("rm_pg", placement_group.id))


def get_node_ip_address() -> str:
    """The address this process's node announced (what rank 0 hands to the others as MASTER_ADDR)."""
    return _need_client().info["ip"]


# `ray.util` is a package; a flat file offers the same spelling through a namespace object.
util = types.SimpleNamespace(
    placement_group=placement_group, remove_placement_group=remove_placement_group,
    get_node_ip_address=get_node_ip_address,
    scheduling_strategies=types.SimpleNamespace(PlacementGroupSchedulingStrategy=PlacementGroupSchedulingStrategy))


# ---- the head: object directory, scheduler, actors, placement groups ------------------------------
# One thread runs everything (a selectors loop), so no state needs a lock: sockets are non-blocking,
# a slow peer only grows its own output buffer, and handshakes run on helper threads that hand
# authenticated sockets to the loop. Each handler is `_on_<op>(peer, ...)` for a message (op, ...).
#   What Ray spreads over several services, the head holds in a handful of dicts: the object directory
# (objects: id -> _Obj, where each object is, who holds or pins it, who waits for it), the task queues,
# the actor table, the workers and nodes with their free resources, the placement groups. Ray has a control
# store (GCS) for cluster tables, a raylet per node that schedules and leases workers, and owners that track
# their objects; nanoray's head is all three, for every node. Simpler to read and to get right (one thread,
# one consistent view, no races between schedulers); the cost is that every task passes through one Python
# thread, which bounds the task rate of the whole cluster (`--bench` measures it).
#   Why a single thread and not one per connection: every handler touches shared tables (a "done" frees
# resources that a queued task of another peer takes), so threads would need one big lock anyway, and the
# loop never blocks: a handler only updates dicts and appends to output buffers.
#   The scheduler, in short: a task whose arguments are all ready enters a FIFO queue keyed by its resource
# shape and strategy (_runnable); _schedule, run after every event that may free or add capacity, walks
# the queues and places the head of each while it fits (_place: a node's pool, or a placement-group bundle),
# then binds a worker (_start: an idle one started with the same GPUs, else a new process). One queue per
# shape stops a big GPU task from blocking the small CPU tasks behind it, while keeping FIFO among equals.
#   Failures: a worker is dead when its socket hits EOF or its process exits (its node manager reports the
# exit code). Its task is retried (max_retries, system failures only) or its returns become errors; an actor
# restarts by running its creation task again (_actor_lost). A node is dead when its raylet's socket
# closes: its workers die with it and objects with no copy elsewhere become ObjectLostError.

@dataclass(eq=False)
class _Obj:
    """The head's record of one object id (also of each actor's handle count and each group's ready flag).
    Lifetime: created pending by a submit (or ready by a put), sealed ready by _seal, freed by _maybe_free
    once nobody holds, pins or still produces it. Arena copies live in `locs`; small values in `desc`."""
    state: str = "pending"  # pending (a task will produce it) | ready
    desc: tuple = None  # ("inline", bytes) | ("error", bytes); None when it lives in arenas
    locs: dict = field(default_factory=dict)  # node id -> (offset, size) of a copy in that node's arena
    size: int = 0
    holders: set = field(default_factory=set)  # peers holding an ObjectRef to it
    pins: int = 0  # tasks using it as an argument, objects containing it, transfers reading it
    contained: tuple = ()  # ids of the refs inside it (pinned while it lives)
    waiters: list = field(default_factory=list)  # (peer, req) of gets waiting for it
    dependents: list = field(default_factory=list)  # tasks waiting for it as an argument
    pulling: set = field(default_factory=set)  # nodes a copy is being transferred to
    actor: str = None  # set for the entry that counts an actor's handles


@dataclass(eq=False)
class _Task:
    """One unit of work as the head tracks it, from submit to _finish (or _fail). Invariant: while not
    done, its deps and contained ids are pinned (they cannot be freed under it); `done` flips exactly once."""
    tid: str
    kind: str  # task | actor (a creation) | call (an actor method)
    job: str
    owner: object  # the submitting peer: it gets the results pushed
    blob: bytes  # the pickled function or class (None for calls)
    name: str  # function, class or method name
    args: object  # the pickled (args, kwargs), or the id of an object holding them
    deps: list  # ids of top-level ref arguments (+ the args object)
    contained: list  # ids of refs nested in the arguments (pinned, not resolved)
    rids: list  # ids of the returns
    opts: dict  # req (resource units), strategy, max_retries, retry_exceptions; calls: aid; actors: the lot
    missing: int = 0  # arguments not ready yet
    done: bool = False  # results sealed (or failed): late events for this task are ignored
    retries: int = 0  # retries left (-1: forever): max_retries for tasks, max_task_retries for calls


@dataclass(eq=False)
class _Actor:
    """One actor: its creation task (kept to restart it), its dedicated worker, its calls. Calls wait in
    `queue` until the actor is alive and their arguments are ready, then move to `inflight` until "done"."""
    aid: str
    spec: _Task  # the creation task, run again on restart
    job: str
    state: str = "pending"  # pending | alive | restarting | dead
    worker: object = None
    queue: deque = field(default_factory=deque)  # calls in submission order, sent when their args are ready
    inflight: dict = field(default_factory=dict)  # task id -> call sent to the worker, not done yet
    restarts: int = 0  # restarts left (-1: unlimited)
    out_of_scope: bool = False  # no handle left: exit once the queue drains
    cause: str = ""  # why it died (the first reason wins): the text of every later ActorDiedError


@dataclass(eq=False)
class _Worker:
    """One worker process. Its GPUs are fixed at spawn (CUDA_VISIBLE_DEVICES cannot change in a live
    process), and its job once bound (it has that driver's sys.path and imported modules): a worker is
    reused only for tasks with the same job and the same GPU indices."""
    wid: str
    node: object
    job: str  # None until its first task (prestarted workers serve any job)
    gpus: tuple  # indices into its node's GPU list, () for a CPU worker
    state: str = "starting"  # starting | idle | busy | actor | leaving (killed, not reused) | dead
    conn: object = None  # its _Peer once it connected (a task may be bound to it before that: sent on hello)
    pid: int = 0
    task: _Task = None  # the plain task it runs
    actor: str = None  # the actor it is dedicated to, for life
    alloc: tuple = None  # what it took from `pool` (_Pool.take's pair), given back when its work ends
    pool: _Pool = None  # its node's pool, or the placement-group bundle's
    blocked_cpu: int = 0  # CPU units lent back while its task waits in get()
    born: float = field(default_factory=time.monotonic)  # spawn time: WORKER_START_TIMEOUT counts from here


@dataclass(eq=False)
class _Node:
    """One machine: its resources (total and the free pool), its arena's allocator and regions, its idle
    workers. The head's own machine is a _Node too, served in-process by self.local (conn None)."""
    nid: str
    conn: object  # the raylet's peer; None for the head's own node
    info: dict  # ip, object server address, arena path and size, hostname
    total: dict
    pool: _Pool
    alloc: _Alloc
    # the arena's regions: offset -> [size, owner]. owner: an object id (sealed) | the peer writing it (not
    # sealed yet) | ("pull", id) (a transfer fills it) | None (let go, waiting for its last reader to unmap)
    allocs: dict = field(default_factory=dict)
    idle: dict = field(default_factory=dict)  # (job, gpus) -> idle workers
    alive: bool = True


@dataclass(eq=False)
class _PG:
    """A placement group. Once created: bundle i lives on nodes[i], carved out of that node's pool into a
    pool of its own, pools[i] (what is free in it, plus what its workers hold, returns on removal)."""
    pgid: str
    bundles: list
    strategy: str
    value: bytes  # the pickled PlacementGroup that ready() resolves to
    detached: bool
    job: str
    state: str = "pending"  # pending | created | removed
    nodes: list = field(default_factory=list)
    pools: list = field(default_factory=list)


class _Peer:
    """The head's end of one authenticated connection (a driver, a worker, a raylet or the CLI)."""

    def __init__(self, sock, addr):
        # rbuf/rpos: bytes received and how far they are parsed; wbuf: frames not yet taken by the kernel
        self.sock, self.addr, self.rbuf, self.rpos, self.wbuf = sock, addr, bytearray(), 0, bytearray()
        self.kind = self.node = self.job = self.worker = None  # set by hello: who it is, its node, job, _Worker
        # what dies with the connection: ids it holds a ref to, regions it maps ((node, offset) -> count),
        # regions it allocated but did not seal, its pending get requests (req -> ids)
        self.held, self.maps, self.allocs, self.subs = set(), Counter(), set(), {}
        self.closed = self.writing = False  # writing: the loop waits for EVENT_WRITE to flush wbuf


class _Head:
    """The cluster's brain, in one process and one thread (see the section comment above)."""

    def __init__(self, cfg: dict, listen: socket.socket, secret: bytes):
        self.cfg, self.secret, self.listen = cfg, secret, listen
        listen.setblocking(False)
        # the selector's key.data says what a ready socket is: "listen", "wake", or the _Peer of a connection
        self.sel = selectors.DefaultSelector()
        self.sel.register(listen, selectors.EVENT_READ, "listen")
        # the self-pipe trick: another thread wakes the loop out of select() by writing a byte to wake_w
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.posted = deque()  # callables from other threads, run by the loop
        self.handshakes = threading.BoundedSemaphore(64)  # handshakes in flight
        # objects: id -> _Obj; queues: (resource shape, strategy) -> deque of runnable tasks; actors: id ->
        # _Actor; names: (namespace, name) -> actor id; pgs: id -> _PG
        self.objects, self.queues, self.actors, self.names, self.pgs = {}, {}, {}, {}, {}
        # nodes: id -> _Node; workers: id -> live _Worker; jobs: job id -> {ns, sys_path, alive};
        # maps: (node id, offset) -> how many live mappings of that region, over all processes
        self.nodes, self.workers, self.jobs, self.maps = {}, {}, {}, Counter()
        # ids: worker/job numbers; rr: SPREAD's round-robin cursor; warned: names already warned (log once)
        self.ids, self.rr, self.stopping, self.warned = itertools.count(), 0, False, set()
        host, port = listen.getsockname()[:2]
        self.address = f"{host}:{port}"
        # the head's own machine is also a node: its manager runs in this process, and its events (a worker
        # exited, a transfer ended) come from helper threads, so they are posted to the loop as if a raylet
        # had sent them, through a socket-less peer (_send to it is a no-op)
        self.local = _NodeManager(os.urandom(4).hex(), self.address, secret, cfg, host,
                                  report=lambda msg: self.post(lambda: self._handle(self.local_peer, msg)))
        self.local_peer = _Peer(None, "local")
        self.local_peer.kind = "node"
        self._add_node(self.local.nid, None, self.local.info())

    # -- the loop
    def post(self, fn) -> None:
        """Run fn on the loop thread, soon, in post order: the only way other threads touch head state."""
        self.posted.append(fn)  # before the wake byte: the loop must find fn when it wakes
        with suppress(OSError):
            self.wake_w.send(b"x")

    def loop(self) -> None:
        """Until shutdown: wait (at most 0.1 s) for sockets, handle what is ready, reap exited workers."""
        next_poll = 0.0
        while not self.stopping:
            for key, events in self.sel.select(timeout=0.1):  # the timeout bounds how late poll() and stop run
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    with suppress(BlockingIOError):  # drain the wake bytes (one per post) in bulk
                        self.wake_r.recv(4096)
                    while self.posted:
                        self.posted.popleft()()
                else:
                    if events & selectors.EVENT_READ:
                        self._read(key.data)
                    if events & selectors.EVENT_WRITE and not key.data.closed:  # (_read may have closed it)
                        self._flush(key.data)
            if time.monotonic() >= next_poll:  # reap exited worker processes of this node, and silent new ones
                self.local.poll()
                next_poll = time.monotonic() + 0.1
                for w in [w for w in self.workers.values() if w.conn is None and w.state != "dead"
                          and next_poll - w.born > WORKER_START_TIMEOUT]:
                    self._worker_dead(w, f"it did not connect within {WORKER_START_TIMEOUT:g} s of its start "
                                         "(stuck importing? NANORAY_WORKER_START_TIMEOUT sets the limit)")
        self._shutdown()

    def _accept(self) -> None:
        """A new connection: authenticate it on a helper thread (the handshake blocks, the loop must not)."""
        try:
            sock, addr = self.listen.accept()
        except OSError:
            return
        if not self.handshakes.acquire(blocking=False):  # a connection flood costs connections, not threads
            _log(f"head: refused a connection from {addr[0]}:{addr[1]}: too many handshakes at once")
            return sock.close()
        threading.Thread(target=self._handshake, args=(sock, addr), daemon=True).start()

    def _handshake(self, sock, addr) -> None:
        try:  # blocking, on its own thread: a silent peer costs a thread for AUTH_TIMEOUT, not the loop
            sock.settimeout(AUTH_TIMEOUT)
            _auth_server(sock, self.secret)
        except (OSError, ConnectionError) as e:
            _log(f"head: refused a connection from {addr[0]}:{addr[1]}: {e}")
            sock.close()
            return
        finally:
            self.handshakes.release()
        _tune(sock)
        sock.setblocking(False)  # from here on only the loop touches it, and the loop never waits on a socket
        # registered by the loop itself (selectors are not thread-safe); bytes that arrive meanwhile wait in
        # the kernel and make the socket readable as soon as it is registered
        self.post(lambda: self.sel.register(sock, selectors.EVENT_READ, _Peer(sock, addr)))

    def _read(self, peer) -> None:
        """Take what the socket has (up to 1 MiB), handle every complete frame in it, keep the partial rest."""
        try:
            data = peer.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self._close(peer, "closed mid-frame" if len(peer.rbuf) > peer.rpos else "closed")
        peer.rbuf += data
        while not peer.closed and len(peer.rbuf) - peer.rpos >= 4:
            (n,) = _LEN.unpack_from(peer.rbuf, peer.rpos)
            if n > MAX_FRAME:  # checked before buffering n bytes: a garbage header cannot make us allocate 4 GB
                return self._close(peer, f"a frame header claims {n} bytes (limit {MAX_FRAME})", loud=True)
            if len(peer.rbuf) - peer.rpos - 4 < n:
                break
            payload = peer.rbuf[peer.rpos + 4:peer.rpos + 4 + n]
            peer.rpos += 4 + n  # advance a cursor instead of deleting the front: no quadratic copying
            try:
                msg = pickle.loads(payload)
            except Exception as e:
                return self._close(peer, f"an undecodable frame ({type(e).__name__}: {e})", loud=True)
            self._handle(peer, msg)  # in arrival order: the ordering guarantees of _Client.send hold here
        if peer.rpos == len(peer.rbuf):  # ends on a frame boundary: start afresh
            peer.rbuf, peer.rpos = bytearray(), 0
        elif peer.rpos > (1 << 20):  # a peer that always sends mid-frame: drop the parsed front now and then
            del peer.rbuf[:peer.rpos]
            peer.rpos = 0

    def _handle(self, peer, msg) -> None:
        """Dispatch one message (op, *args) to _on_<op>(peer, *args). Only authenticated peers get here, so a
        bad message is a bug or a version mismatch, not an attack: it is logged and costs its connection."""
        try:
            if peer.kind is None and msg[0] != "hello":
                raise ValueError("the first message must be hello")
            getattr(self, "_on_" + msg[0])(peer, *msg[1:])
        except Exception as e:  # a malformed message (or a bug) costs that peer its connection, not the head
            _log(f"head: bad message {str(msg)[:80]} from {peer.kind} {peer.addr}: {e!r}\n{traceback.format_exc()}")
            self._close(peer, "bad message")

    def _send(self, peer, msg) -> None:
        """Queue msg for peer and send what the kernel takes now; never blocks. A closed peer (or the local
        node's socket-less peer) drops it: whoever waited for it learns of the death another way."""
        if not peer.closed and peer.sock is not None:
            queued = bool(peer.wbuf)
            peer.wbuf += _frame(msg)
            if not queued:  # else the loop flushes once the socket is writable again (frames stay in order)
                self._flush(peer)

    def _flush(self, peer) -> None:
        """Send what the socket takes now; while bytes are left, the loop also waits for EVENT_WRITE."""
        try:
            n = peer.sock.send(peer.wbuf)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            return self._close(peer, f"send failed: {e}")
        del peer.wbuf[:n]
        # ask for EVENT_WRITE only while bytes are left: a writable socket with nothing to write would make
        # select() return at once forever (a busy loop)
        if peer.writing != bool(peer.wbuf):
            peer.writing = bool(peer.wbuf)
            self.sel.modify(peer.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.writing else 0), peer)

    def _close(self, peer, why, loud=False) -> None:
        """A connection ended (EOF, error, bad message): undo everything it had, in this order: its refs,
        its mappings, its unsealed regions, then what its kind implies (a worker's task is retried or failed,
        a driver's job ends, a node's workers and objects are lost). Idempotent."""
        if peer.closed or peer.sock is None:
            return
        peer.closed = True
        if loud or peer.kind is None:
            _log(f"head: dropped {peer.kind or 'unidentified'} peer {peer.addr}: {why}")
        self.sel.unregister(peer.sock)
        peer.sock.close()
        for oid in peer.held:  # everything it held is released
            o = self.objects.get(oid)
            if o is not None:
                o.holders.discard(peer)
                self._maybe_free(oid, o)
        for key, n in peer.maps.items():
            self._unmap(key, n)
        for nid, off in peer.allocs:  # regions it allocated but never sealed
            self._release_region(nid, off, peer)
        if peer.kind == "worker" and peer.worker is not None:
            self._worker_dead(peer.worker, why)
        elif peer.kind == "driver":
            self._job_end(peer.job)
        elif peer.kind == "node" and peer.node is not None:
            self._node_dead(peer.node)

    # -- peers arrive
    def _on_hello(self, peer, info) -> None:
        """A peer says who it is (kind: driver | worker | node | cli); the reply (request 0) tells it its node's
        facts: the arena to map, the ip, the job id."""
        peer.kind = info["kind"]
        if peer.kind == "driver":
            # a driver needs a node on its own machine: large objects go through that node's arena
            here = [n for n in self.nodes.values() if n.alive and n.info["host"] == info["host"]]
            if not here:
                self._send(peer, ("reply", 0, ValueError(
                    f"no nanoray node runs on this machine ({info['host']}); start one with "
                    f"`python nanoray.py start --address {self.address}` first")))
                return self._close(peer, "no local node")
            # one job per driver connection: its tasks, actors, workers and groups end when it disconnects
            peer.node, peer.job = here[0], f"job{next(self.ids)}"
            self.jobs[peer.job] = {"ns": info["namespace"] or peer.job, "sys_path": info["sys_path"], "alive": True}
        elif peer.kind == "worker":
            w = self.workers.get(info["wid"])  # the id we gave it at spawn: it ties the process to its record
            if w is None or w.state == "dead":  # e.g. killed (its job ended) before it got to connect
                return self._close(peer, "unknown worker")
            w.conn, w.pid, peer.worker, peer.node = peer, info["pid"], w, w.node
        elif peer.kind == "node":
            peer.node = self._add_node(info["nid"], peer, info)
        info = peer.node.info if peer.node else {}  # ip, arena path and size, ... of the peer's node
        self._send(peer, ("reply", 0, dict(info, job=peer.job, address=self.address, node=info.get("nid"))))
        if peer.kind == "worker":
            w = peer.worker
            if w.job is not None:
                self._send(peer, ("bind", self.jobs[w.job]["sys_path"]))
            if w.task is not None or w.actor is not None:  # spawned for a task: it has been waiting for this
                self._dispatch(w)
            else:  # a prestarted worker: now it can take queued work
                self._idle(w)
                self._schedule()

    def _add_node(self, nid, conn, info) -> _Node:
        """Register a machine (the head's own, or a raylet that said hello) and start its workers."""
        gpus = {i: UNIT for i in range(info["num_gpus"])}
        total = {"CPU": info["num_cpus"] * UNIT, "GPU": len(gpus) * UNIT, **info["resources"]}
        node = _Node(nid, conn, info, total, _Pool(total, gpus), _Alloc(info["arena_size"]))
        self.nodes[nid] = node
        for _ in range(info["num_cpus"]):  # prestart a worker per CPU, as Ray does
            self._spawn(node, None, ())
        self._schedule()
        return node

    # -- references and objects
    # An object lives while it has a holder (a peer with an ObjectRef to it), a pin (a task using it as an
    # argument, an object containing it, a transfer reading it) or a producer (state pending). The last of
    # those to go calls _maybe_free. Its arena regions are a second, lower level: a region returns to the
    # allocator only when its object let go of it AND no process still maps it (self.maps), because a reader's
    # arrays may outlive the object itself (get, then drop the ref, keep the array).
    def _on_refs(self, peer, ops) -> None:
        """The ref ops a process queued since its last message, applied in its order (see _Client.send)."""
        for op, x in ops:
            if op == "+" and x in self.objects:  # (an unknown id was freed already: a get on it raises)
                self.objects[x].holders.add(peer)
                peer.held.add(x)
            elif op == "-":
                peer.held.discard(x)
                o = self.objects.get(x)
                if o is not None:
                    o.holders.discard(peer)
                    self._maybe_free(x, o)
            elif op == "m":  # a process mapped a region of its node's arena (x: the offset)
                self.maps[(peer.node.nid, x)] += 1
                peer.maps[(peer.node.nid, x)] += 1
            elif op == "u":  # ... and its last view of that mapping is gone
                peer.maps[(peer.node.nid, x)] -= 1
                self._unmap((peer.node.nid, x), 1)

    def _new_obj(self, oid, holder, **kw) -> _Obj:
        """Record a new object; holder (a peer, or None) is counted at once, before any "+" could arrive."""
        o = self.objects[oid] = _Obj(**kw)
        if holder is not None:
            o.holders.add(holder)
            holder.held.add(oid)
        return o

    def _maybe_free(self, oid, o) -> None:
        """Free the object if nothing keeps it: its regions are let go, the refs it contained are unpinned
        (which may free them in turn: a cascade), and an actor whose last handle this was is told to exit."""
        # a pending object is kept even without holders: its task will seal it (the result is then freed
        # right after the push). The identity check makes a call on an already freed _Obj a no-op.
        if o.holders or o.pins or o.state == "pending" or self.objects.get(oid) is not o:
            return
        del self.objects[oid]
        for nid, (off, _) in o.locs.items():
            self._release_region(nid, off, oid)
        for c in o.contained:
            self._unpin(c)
        a = self.actors.get(o.actor) if o.actor is not None else None
        if a is not None:
            if not a.spec.opts["detached"]:
                a.out_of_scope = True
                self._maybe_exit(a)
            self._forget(a)

    def _pin(self, oid) -> None:
        """Keep oid alive for a task or a containing object (an unknown id is ignored: its get raises)."""
        if oid in self.objects:
            self.objects[oid].pins += 1

    def _unpin(self, oid) -> None:
        o = self.objects.get(oid)
        if o is not None:
            o.pins -= 1
            self._maybe_free(oid, o)

    def _release_region(self, nid, off, owner) -> None:
        """The owner lets go of a region: it returns to the allocator once no process maps it."""
        node = self.nodes.get(nid)
        reg = node.allocs.get(off) if node else None
        if reg is None or reg[1] != owner:  # not (or no longer) this owner's: e.g. already sealed by another
            return
        reg[1] = None  # owner-less: from now on only the mappings keep it
        if not self.maps.get((nid, off)):
            node.alloc.free(off, reg[0])
            del node.allocs[off]

    def _unmap(self, key, n) -> None:
        """n mappings of region key = (node id, offset) are gone; the last one frees an owner-less region."""
        left = self.maps[key] - n
        if left > 0:
            self.maps[key] = left
            return
        self.maps.pop(key, None)
        node = self.nodes.get(key[0])
        if node and node.allocs.get(key[1], [0, 1])[1] is None:
            self._release_region(key[0], key[1], None)

    def _rpc_alloc(self, peer, size):
        """A region of `size` bytes in the arena of the caller's node; it belongs to the caller until sealed."""
        node = peer.node
        off = node.alloc.alloc(size)
        if off is None:
            raise ObjectStoreFullError(
                f"the object store of node {node.nid} is full: {size / 1e6:.1f} MB do not fit in "
                f"{node.alloc.free_bytes() / 1e6:.1f} MB free of {node.alloc.size / 1e6:.1f} MB; drop references "
                f"to objects you no longer need, or init(object_store_memory=...)")
        node.allocs[off] = [size, peer]
        peer.allocs.add((node.nid, off))
        return off

    def _on_unalloc(self, peer, offs) -> None:
        """A worker gives back regions it allocated but will not seal (a multi-return store failed midway)."""
        for off in offs:
            peer.allocs.discard((peer.node.nid, off))
            self._release_region(peer.node.nid, off, peer)

    def _on_put(self, peer, oid, desc, contained, hold) -> None:
        """put() (hold: the putter holds a ref) or a large argument object (no holder: the submit pins it)."""
        self._seal(oid, self._new_obj(oid, peer if hold else None), desc, contained, peer.node, peer)

    def _seal(self, oid, o, desc, contained, node, writer) -> None:
        """The value of `oid` exists now: record where, wake its gets and the tasks waiting for it."""
        # sealing is the publication point: the writer finished its copy before it sent put/done, and only
        # now can any reader learn the descriptor, so no reader ever sees a half-written region
        if desc[0] == "shm":
            off, o.size = desc[1], desc[2]
            node.allocs[off][1] = oid  # the region belongs to the object from now on
            writer.allocs.discard((node.nid, off))
            o.locs[node.nid] = (off, o.size)
        else:
            o.desc, o.size = desc, len(desc[1])
        o.contained, o.state = tuple(contained), "ready"
        for c in contained:
            self._pin(c)
        self._notify(oid, o)

    def _desc_for(self, o, node):
        """What a process on `node` needs to read o: its inline/error descriptor, the local arena copy, or None
        (the object is only in other nodes' arenas: it must be pulled first)."""
        if o.desc is not None:
            return o.desc
        loc = o.locs.get(node.nid) if node else None
        return None if loc is None else ("shm",) + loc

    def _notify(self, oid, o) -> None:
        """oid became readable somewhere (sealed, copied to a node, or turned into an error): answer the gets
        that can read it now, start copies for the others, and tell the tasks waiting for it as an argument."""
        waiting = []
        for peer, req in o.waiters:
            if peer.closed:
                continue
            d = self._desc_for(o, peer.node)
            if d is None:  # ready, but on another node: copy it over first
                self._pull(oid, o, peer.node)
                waiting.append((peer, req))
            else:
                self._send(peer, ("objs", req, [(oid, d)]))
        o.waiters = waiting
        dependents, o.dependents = o.dependents, []
        for t in dependents:
            self._dep_ready(t, o)

    def _on_get(self, peer, req, oids, ack) -> None:
        """Answer now with what is readable on the peer's node, subscribe (peer, req) to the rest: each is
        answered by _notify later (and copied to the peer's node first if it is elsewhere)."""
        ready = []
        for oid in oids:
            o = self.objects.get(oid)
            if o is None:
                ready.append((oid, _error_desc(ObjectLostError(f"object {oid} was freed (no reference left)"))))
            elif o.state == "ready" and self._desc_for(o, peer.node) is not None:
                ready.append((oid, self._desc_for(o, peer.node)))
            else:
                o.waiters.append((peer, req))
                peer.subs.setdefault(req, []).append(oid)
                if o.state == "ready":
                    self._pull(oid, o, peer.node)
        if ready or ack:  # wait() needs an answer even when nothing is ready yet
            self._send(peer, ("objs", req, ready))

    def _on_unsub(self, peer, req) -> None:
        for oid in peer.subs.pop(req, ()):
            o = self.objects.get(oid)
            if o is not None:
                o.waiters = [w for w in o.waiters if w != (peer, req)]

    def _pull(self, oid, o, dst) -> None:
        """Copy an arena object to node dst: dst's manager fetches it from a node that has it."""
        if dst.nid in o.pulling:  # one copy per (object, node), however many readers wait for it there
            return
        src = next((self.nodes[n] for n in o.locs if self.nodes[n].alive), None)
        off = dst.alloc.alloc(o.size) if src else None
        if off is None:
            return self._fail_waiters(oid, o, dst, ObjectLostError(f"object {oid}: no live copy") if src is None
                                      else ObjectStoreFullError(f"object {oid} ({o.size / 1e6:.1f} MB) does not "
                                                                f"fit in the store of node {dst.nid}"))
        dst.allocs[off] = [o.size, ("pull", oid)]
        o.pins += 1  # the source region must outlive the transfer: the object cannot be freed until "pulled"
        o.pulling.add(dst.nid)
        # the bytes go node to node (dst connects to src's object server), never through the head
        self._node_call(dst, "pull", oid, src.info["objects"], o.locs[src.nid][0], o.size, off)

    def _fail_waiters(self, oid, o, node, exc) -> None:
        """The gets waiting for `oid` on `node` fail with exc instead of waiting forever."""
        for peer, req in [w for w in o.waiters if w[0].node is node]:
            self._send(peer, ("objs", req, [(oid, _error_desc(exc))]))
        o.waiters = [w for w in o.waiters if w[0].node is not node]

    def _on_pulled(self, peer, oid, nid, off, err) -> None:
        """A transfer ended: on success the object has one more location and its waiters there are answered;
        on failure the region is given back and those waiters get ObjectLostError."""
        node, o = self.nodes[nid], self.objects.get(oid)
        if o is not None:
            o.pins -= 1
            o.pulling.discard(nid)
        if err is None and o is not None and node.alive:
            node.allocs[off][1] = oid
            o.locs[nid] = (off, o.size)
            self._notify(oid, o)
        else:
            _log(f"head: transfer of {oid} to node {nid} failed: {err}")
            self._release_region(nid, off, ("pull", oid))
            if o is not None:
                self._fail_waiters(oid, o, node, ObjectLostError(f"object {oid}: the transfer to node {nid} "
                                                                 f"failed: {err}"))
        if o is not None:
            self._maybe_free(oid, o)

    # -- tasks
    # A task's life at the head: _on_submit -> _admit -> _check_deps -> (waits in its arguments' dependents
    # lists) -> _runnable -> a queue -> _schedule/_place/_start -> running on a worker -> _on_done -> _finish.
    # Failure exits: _fail (a failed or freed argument, a dead driver, a removed group) and _worker_dead
    # (retry, or WorkerCrashedError). Every exit goes through _finish, which seals the returns exactly once.
    def _job(self, peer):
        return peer.job if peer.kind == "driver" else peer.worker.job

    def _admit(self, t: _Task, peer) -> None:
        """The returns exist from now on (pending, held by the submitter) and the arguments are pinned."""
        for rid in t.rids:
            self._new_obj(rid, peer)
        for d in t.deps + t.contained:
            self._pin(d)

    def _check_deps(self, t: _Task) -> None:
        """Count the arguments still being produced and subscribe to them; run the task when none is."""
        t.missing = 0
        for d in t.deps:
            o = self.objects.get(d)
            if o is None or (o.desc is not None and o.desc[0] == "error"):
                return self._fail(t, o.desc if o else _error_desc(ObjectLostError(f"argument {d} was freed")))
            if o.state == "pending":
                o.dependents.append(t)
                t.missing += 1
        if t.missing == 0:
            self._runnable(t)

    def _dep_ready(self, t, o) -> None:
        if t.done:
            return
        if o.desc is not None and o.desc[0] == "error":  # an argument failed: so does this task (Ray's rule)
            return self._fail(t, o.desc)
        t.missing -= 1
        if t.missing == 0:
            self._runnable(t)

    def _runnable(self, t) -> None:
        """All arguments are ready: queue the task for the scheduler (an actor call goes to its actor's queue,
        which is already in order). Also the re-entry point of retries and actor restarts."""
        if not self.jobs[t.job]["alive"] and not (t.kind == "actor" and t.opts["detached"]):
            return self._fail(t, _error_desc(RayError("its driver exited")))
        if t.kind == "call":
            return self._pump_actor(self.actors[t.opts["aid"]])
        # one FIFO per (resource shape, strategy): tasks that ask the same are served in submission order
        key = (tuple(sorted(t.opts["req"].items())), repr(t.opts["strategy"]))
        self.queues.setdefault(key, deque()).append(t)
        self._schedule()

    def _on_submit(self, peer, tid, blob, name, args, deps, contained, rids, opts) -> None:
        """f.remote(): the submitter is the owner (results are pushed to it) and first holder of the returns."""
        t = _Task(tid, "task", self._job(peer), peer, blob, name, args, deps, contained, rids, opts,
                  retries=opts["max_retries"])
        self._admit(t, peer)
        self._check_deps(t)

    def _finish(self, t, results, node, writer) -> None:
        """Seal a task's results (or its error), release its arguments, push results to its owner."""
        if t.done:  # failed while it ran (its group was removed): the late results' regions go with its worker
            return
        t.done = True
        for rid, desc, contained in results:
            o = self.objects.get(rid)
            if o is None or o.state != "pending":  # nobody wants it any more: give the region back
                # (defensive: a pending return is never freed, so this should not happen)
                if desc[0] == "shm":
                    writer.allocs.discard((node.nid, desc[1]))
                    self._release_region(node.nid, desc[1], writer)
                continue
            self._seal(rid, o, desc, contained, node, writer)
        for d in t.deps + t.contained:  # after the seal: results that contain an argument pin it first
            self._unpin(d)
        if t.rids and not t.owner.closed:  # the owner waits for this push instead of asking (None: ask)
            self._send(t.owner, ("objs", None, [(r, self._desc_for(self.objects[r], t.owner.node) if r in
                                                 self.objects else None) for r in t.rids]))
        for rid in t.rids:  # no longer pending: a result whose refs were all dropped is freed now
            if rid in self.objects:
                self._maybe_free(rid, self.objects[rid])

    def _fail(self, t, desc) -> None:
        """Finish t with an error descriptor as every return (an actor creation: the actor dies instead)."""
        if t.done:
            return
        if t.kind == "actor":
            a = self.actors[t.tid]
            return self._actor_dead(a, "its constructor could not run: " + _desc_text(desc))
        self._finish(t, [(r, desc, ()) for r in t.rids], None, None)

    def _on_done(self, peer, tid, results, failed) -> None:
        """A worker finished a task or an actor call. results: [(return id, descriptor, contained ids)];
        failed: _run_call caught an exception (the descriptors are errors)."""
        w = peer.worker
        if w.actor is not None:  # an actor call: the worker stays the actor's; its calls may run concurrently
            a = self.actors[w.actor]
            t = a.inflight.pop(tid, None)
            if t is not None:  # None: the call was already failed (the actor was declared dead meanwhile)
                self._finish(t, results, w.node, peer)
            self._maybe_exit(a)
            return
        t, w.task = w.task, None
        self._release_worker(w)  # resources back and the worker idle BEFORE the retry/finish, so _schedule sees both
        if failed and t.opts["retry_exceptions"] and t.retries != 0:  # an application error, retried on request
            t.retries -= 1
            self._runnable(t)
        else:
            self._finish(t, results, w.node, peer)
        self._schedule()

    def _on_blocked(self, peer, flag) -> None:
        """The worker's task waits in get() (flag True) or stopped waiting: lend its CPUs to the pool meanwhile.
        Only CPUs: a GPU is bound to the process (CUDA_VISIBLE_DEVICES), and actors are never blocked here."""
        w = peer.worker
        if w is None or w.alloc is None or w.actor is not None:
            return
        if flag and not w.blocked_cpu and w.alloc[0].get("CPU"):
            w.blocked_cpu = w.alloc[0]["CPU"]
            w.alloc[0]["CPU"] = 0  # the alloc now holds no CPU: whatever happens next, give() cannot double-return it
            w.pool.free["CPU"] += w.blocked_cpu
            self._schedule()
        elif not flag and w.blocked_cpu:  # take it back, even if that oversubscribes for a moment (as Ray)
            w.pool.free["CPU"] -= w.blocked_cpu
            w.alloc[0]["CPU"], w.blocked_cpu = w.blocked_cpu, 0

    # -- scheduling: queues per resource shape; a task takes resources, then a worker
    # Ray's raylets schedule locally first and spill to other nodes; its control store places actors and
    # groups. Here one function sees every node's free pool, so placement is a plain loop over nodes.
    def _schedule(self) -> None:
        """Start everything that fits now. Called after any event that may free or add capacity (a task
        done, a worker or node arrived, a CPU lent back, a group removed) and after each new runnable task.
        Pending placement groups are tried first, so resources that free up go to a waiting group before the
        queued tasks; nothing is held back while it does not fit, so a steady stream of small tasks can still
        keep a large group waiting."""
        for pg in [p for p in self.pgs.values() if p.state == "pending"]:
            self._place_pg(pg)
        for key in list(self.queues):
            q = self.queues[key]
            while q:
                t = q[0]
                placed = None if t.done else self._place(t)  # (done: failed while queued, dropped lazily here)
                # stopping at the first task that does not fit is exact, not a heuristic: every task of this
                # queue asks for the same resources under the same strategy, so none behind it would fit
                if placed is None and not t.done:
                    break
                q.popleft()
                if placed is not None:
                    self._start(t, *placed)
            if not q:
                del self.queues[key]

    def _place(self, t):
        """Where t can run now -> (node, pool, alloc) with the resources already taken, or None (it waits)."""
        req, s = t.opts["req"], t.opts["strategy"]
        if s is not None and s[0] == "pg":
            pg = self.pgs.get(s[1])
            if pg is None or pg.state == "removed":
                self._fail(t, _error_desc(RayError(f"{t.name}: placement group {s[1]} was removed")))
                return None
            if pg.state != "created":
                return None
            for i in (range(len(pg.pools)) if s[2] < 0 else [s[2]]):
                alloc = pg.pools[i].take(req) if pg.nodes[i].alive else None  # (bundles are not moved)
                if alloc is not None:
                    return pg.nodes[i], pg.pools[i], alloc
            return None
        nodes = [n for n in self.nodes.values() if n.alive]
        if s == "SPREAD":  # rotate the start node per task: consecutive tasks land on different nodes
            self.rr += 1
            nodes = nodes[self.rr % len(nodes):] + nodes[:self.rr % len(nodes)]
        else:  # the submitter's node first: its arguments are likely there (sort is stable: then node order)
            nodes.sort(key=lambda n: n is not t.owner.node)
        for n in nodes:
            alloc = n.pool.take(req)
            if alloc is not None:
                return n, n.pool, alloc
        # infeasible (no node is big enough even when idle): say so once per name, and keep it queued, since
        # a bigger node may join (a get(timeout=) on its result still returns in time)
        if not any(all(n.total.get(k, 0) >= v for k, v in req.items()) for n in nodes) and t.name not in self.warned:
            self.warned.add(t.name)
            _log(f"head: {t.name} asks for {_fmt_res(req)}, more than any node has; it waits for a node that does")
        return None

    def _start(self, t, node, pool, alloc) -> None:
        """Bind t to a worker on node: a reusable idle one, else a new process (t is sent when it connects)."""
        gpus = tuple(sorted(alloc[1]))
        w = None
        for key in ((t.job, gpus), (None, gpus)):  # an idle worker of this job, else an unbound one
            while w is None and node.idle.get(key):
                # pop(): the most recently idle worker (warm caches). Idle lists are cleaned lazily: an entry
                # may be a worker that died or was taken since, hence the state check
                cand = node.idle[key].pop()
                w = cand if cand.state == "idle" else None
        if w is None:
            w = self._spawn(node, t.job, gpus)
        elif w.job is None:  # a prestarted worker joins this job for good (it gets the driver's sys.path)
            w.job = t.job
            self._send(w.conn, ("bind", self.jobs[t.job]["sys_path"]))
        w.alloc, w.pool = alloc, pool
        if t.kind == "actor":
            a = self.actors[t.tid]
            a.worker, w.actor, w.state = w, a.aid, "actor"
        else:
            w.task, w.state = t, "busy"
        if w.conn is not None:  # else _on_hello dispatches when the new process connects
            self._dispatch(w)

    def _spawn(self, node, job, gpus) -> _Worker:
        """Ask node's manager for a new worker process; its record exists now, its connection later (hello).
        A spawn costs a fresh interpreter's start-up (more with heavy imports): hence prestarted workers."""
        w = _Worker(f"w{next(self.ids)}", node, job, gpus)
        self.workers[w.wid] = w
        self._node_call(node, "spawn", w.wid, list(gpus))
        return w

    def _dispatch(self, w) -> None:
        """Send a bound worker its work: an actor's constructor, or a task. Argument descriptors ride along,
        so a worker reads arguments already on its node without asking."""
        if w.actor is not None:
            t = self.actors[w.actor].spec
            self._send(w.conn, ("create", t.tid, t.blob, t.name, t.args, self._dep_descs(t, w.node), t.opts))
        else:
            t = w.task
            self._send(w.conn, ("exec", t.tid, t.blob, t.name, t.args, self._dep_descs(t, w.node), t.rids,
                                t.opts.get("retry_on")))

    def _dep_descs(self, t, node) -> list:
        return [(d, self._desc_for(self.objects[d], node)) for d in t.deps if d in self.objects]

    def _idle(self, w) -> None:
        """File w under (job, gpus) for _start to reuse. Idle workers are not reaped: they live until their
        job ends (unbound ones until the cluster stops)."""
        w.state = "idle"
        w.node.idle.setdefault((w.job, w.gpus), []).append(w)

    def _release_worker(self, w) -> None:
        """Give w's resources back to its pool (node or bundle); a task worker becomes idle."""
        if w.alloc is not None:
            w.pool.give(w.alloc)
        w.alloc = w.pool = None
        w.blocked_cpu = 0
        if w.state == "busy":
            self._idle(w)

    def _node_call(self, node, method, *args) -> None:
        """Run a _NodeManager method on node: in this process for the head's machine, else a message."""
        if node.conn is None:
            getattr(self.local, method)(*args)
        elif node.alive:
            self._send(node.conn, ("node", method, args))

    # -- actors
    # An actor = a creation task that binds a worker for good + a queue of calls. States: pending (creation
    # queued or its constructor running) -> alive ("created" arrived) -> restarting (its process died and
    # restarts are left: the creation task runs again, in a new process, from scratch) -> ... -> dead (out of
    # restarts, killed, constructor failed, driver gone, or no handle left). Calls queue while it is not alive,
    # and are sent in order once it is. Ray does the same with the creation task kept by the control store;
    # its per-caller ordering and out-of-order execution for threaded actors are subtler than this one queue.
    def _rpc_create_actor(self, peer, aid, blob, cls_name, args, deps, contained, opts, methods):
        """A.remote(): record the actor and queue its creation task; returns its id (another's for
        get_if_exists). A name is taken at once, so a second create with that name fails at its call site."""
        job = self._job(peer)
        if opts["name"]:
            key = (opts["namespace"] or self.jobs[job]["ns"], opts["name"])
            old = self.actors.get(self.names.get(key))
            if old is not None and old.state != "dead":
                # no actor will pin this call's arguments: free the object of large ones (put unheld, for that pin)
                for d in [d for d in deps if d in self.objects]:
                    self._maybe_free(d, self.objects[d])
                if opts["get_if_exists"]:
                    return self._rpc_get_actor(peer, opts["name"], key[0])[0]
                raise ValueError(f"the actor name {opts['name']!r} is already taken in namespace {key[0]!r}")
            self.names[key] = aid
        opts = dict(opts, methods=methods, cls_name=cls_name)
        t = _Task(aid, "actor", job, peer, blob, cls_name, args, deps, contained, [], opts)
        self.actors[aid] = _Actor(aid, t, job, restarts=opts["max_restarts"])
        # counts the handles; a detached actor's is pinned: get_actor must find it after its creator is gone
        self._new_obj(aid, peer, state="ready", actor=aid).pins = int(opts["detached"])
        self._admit(t, peer)  # pins the constructor's arguments for the actor's whole life (restarts reuse them)
        self._check_deps(t)
        return aid

    def _on_created(self, peer, aid, err) -> None:
        """The constructor returned (err None) or raised. A raising constructor is not restarted: it would
        raise again."""
        a = self.actors.get(aid)
        if a is None or a.state == "dead":
            return
        if err is not None:                       # (descriptor, its text): never unpickled here
            return self._actor_dead(a, "its constructor raised: " + err[1])
        a.state = "alive"
        self._pump_actor(a)

    def _on_call(self, peer, tid, aid, method, args, deps, contained, rids) -> None:
        """handle.method.remote(): queue the call behind the actor's earlier ones (a dead actor: fail it)."""
        a = self.actors.get(aid)
        t = _Task(tid, "call", self._job(peer), peer, None, method, args, deps, contained, rids,
                  {"aid": aid}, retries=a.spec.opts["max_task_retries"] if a else 0)
        self._admit(t, peer)
        if a is None or a.state == "dead":
            return self._fail(t, _error_desc(ActorDiedError(f"the actor {aid} is dead: {a.cause if a else '?'}")))
        a.queue.append(t)
        self._check_deps(t)

    def _pump_actor(self, a) -> None:
        """Send the calls at the head of the queue whose arguments are ready (in order: a call waiting
        for an argument holds back the ones behind it, as Ray orders one caller's calls)."""
        while a.state == "alive" and a.queue and (a.queue[0].done or a.queue[0].missing == 0):
            t = a.queue.popleft()
            if not t.done:
                a.inflight[t.tid] = t
                self._send(a.worker.conn, ("call", t.tid, t.name, t.args, self._dep_descs(t, a.worker.node), t.rids))
        self._maybe_exit(a)

    def _maybe_exit(self, a) -> None:
        """An actor whose last handle is gone exits once it has nothing queued or running."""
        if a.out_of_scope and a.state == "alive" and not a.queue and not a.inflight:
            self._actor_dead(a, "all its handles are gone")

    def _actor_lost(self, a, why) -> None:
        """The actor's process died: fail (or retry) what ran there, restart if it may."""
        a.worker = None
        inflight, a.inflight = list(a.inflight.values()), {}
        # calls that were running: retried in the new process if max_task_retries allows (they go back to the
        # FRONT of the queue, in their old order), else failed. FOOTGUN: a retried call runs again from
        # scratch on the restarted actor, whose state is whatever its constructor makes
        retry = [t for t in inflight if t.retries != 0 and a.state != "dead"]
        for t in inflight:
            if t in retry:
                t.retries -= 1
            else:  # RayActorError, not ActorDiedError: the actor itself may come back
                self._fail(t, _error_desc(RayActorError(
                    f"the actor {a.spec.name} ({a.aid}) died while running {t.name}: {why}")))
        a.queue.extendleft(reversed(retry))
        if a.state != "dead" and a.restarts != 0:
            a.restarts, a.state = a.restarts - 1, "restarting"
            self._runnable(a.spec)
        else:
            self._actor_dead(a, why)

    def _actor_dead(self, a, why) -> None:
        """The actor is dead for good: fail its calls, release its constructor's arguments, kill its
        process. Its resources return when the process is seen dead (_worker_dead). Idempotent."""
        first = a.state != "dead"
        a.state, a.cause = "dead", a.cause or why
        for t in list(a.queue) + list(a.inflight.values()):
            self._fail(t, _error_desc(ActorDiedError(f"the actor {a.spec.name} ({a.aid}) is dead: {a.cause}")))
        a.queue.clear()
        a.inflight.clear()
        if first and not a.spec.done:
            a.spec.done = True
            for d in a.spec.deps + a.spec.contained:
                self._unpin(d)
        if first and a.spec.opts["detached"]:  # its handle entry was pinned to outlive its creator: no more
            self._unpin(a.aid)
        if a.worker is not None:
            self._node_call(a.worker.node, "kill", a.worker.wid)
        self._forget(a)

    def _forget(self, a) -> None:
        """Drop a dead actor's record (and its name) once nothing can reach it: no handle left (its handle
        entry is freed) and no process (a late frame from it would look the actor up). A long run that starts
        and kills many actors would grow the table forever. A handle that comes back later (unpickled from an
        old object) reaches no record: its calls fail with ActorDiedError all the same, without the cause."""
        if a.state != "dead" or a.worker is not None or a.aid in self.objects or self.actors.get(a.aid) is not a:
            return
        del self.actors[a.aid]
        key = (a.spec.opts["namespace"] or self.jobs[a.job]["ns"], a.spec.opts["name"])
        if self.names.get(key) == a.aid:
            del self.names[key]

    def _rpc_kill(self, peer, aid, no_restart):
        """kill(): no_restart -> dead now; else just kill the process and let _actor_lost restart it."""
        a = self.actors.get(aid)
        if a is None:  # dead and forgotten (_forget): as in Ray, killing a dead actor does nothing
            return
        if no_restart:
            self._actor_dead(a, "killed by nanoray.kill()")
        elif a.worker is not None:
            self._node_call(a.worker.node, "kill", a.worker.wid)

    def _rpc_get_actor(self, peer, name, namespace):
        key = (namespace or self.jobs[self._job(peer)]["ns"], name)
        a = self.actors.get(self.names.get(key))
        if a is None or a.state == "dead":
            raise ValueError(f"Failed to look up actor with name '{name}' in namespace '{key[0]}'")
        # counted now: the creator may drop its handle meanwhile. An actor whose last handle just went, still
        # starting or running calls, has no handle entry any more: it is back in scope
        o = self.objects.get(a.aid) or self._new_obj(a.aid, None, state="ready", actor=a.aid)
        o.holders.add(peer)
        peer.held.add(a.aid)
        a.out_of_scope = False
        return a.aid, a.spec.name, a.spec.opts["methods"]

    # -- failures
    # Two signals can report one death, in either order: the worker's socket reaching EOF (_close) and its
    # node manager seeing the process exit (_on_worker_exit, with the exit code). Both land here; the first
    # one acts, the second finds state "dead" and returns. Ray's policy is kept: a system failure (the
    # process died) is retried by default, because it is usually not the task's fault (OOM kill, node loss);
    # an exception from user code is not, unless retry_exceptions, because it would most likely raise again.
    def _worker_dead(self, w, why) -> None:
        """A worker process is gone: free what it had, retry or fail its task, restart or bury its actor."""
        if w.state == "dead":
            return
        w.state = "dead"
        self.workers.pop(w.wid, None)
        if w.conn is not None:  # (re-entry from _close is harmless: the state is already "dead")
            self._close(w.conn, why)
        self._node_call(w.node, "kill", w.wid)  # a socket that died first may hide a process that lives on
        t, w.task = w.task, None
        self._release_worker(w)
        if t is not None and not t.done:
            if not self.jobs[t.job]["alive"]:
                self._fail(t, _error_desc(RayError("its driver exited")))
            elif t.retries != 0:  # a system failure: retried up to max_retries (-1: forever)
                t.retries -= 1
                self._runnable(t)
            else:
                n = t.opts["max_retries"]
                self._fail(t, _error_desc(WorkerCrashedError(
                    f"the worker (pid {w.pid}) running {t.name} died ({why}); tried {n + 1} time(s), "
                    f"max_retries={n}")))
        if w.actor is not None:
            self._actor_lost(self.actors[w.actor], f"its worker (pid {w.pid}) died: {why}")
        self._schedule()

    def _on_worker_exit(self, peer, wid, code) -> None:
        """A node manager reaped a worker process (also one that died before it ever connected)."""
        w = self.workers.get(wid)
        if w is not None:
            self._worker_dead(w, f"exit code {code}")

    def _job_end(self, job) -> None:
        """A driver disconnected (exit, crash, shutdown): its actors die (detached ones stay), its task workers
        are killed, its queued tasks fail, its groups are removed (detached ones stay)."""
        self.jobs[job]["alive"] = False
        for a in list(self.actors.values()):  # (a list: _actor_dead may _forget)
            if a.job == job and not a.spec.opts["detached"] and a.state != "dead":
                self._actor_dead(a, "its driver exited")
        for w in list(self.workers.values()):
            if w.job == job and w.actor is None:  # "leaving": never reused, e.g. by a detached actor of this job
                w.state = "leaving"
                self._node_call(w.node, "kill", w.wid)
        # (a detached actor's queued creation is spared, as _runnable spares it: it outlives its driver)
        for t in [t for q in self.queues.values() for t in q if t.job == job and not t.opts.get("detached")]:
            self._fail(t, _error_desc(RayError("its driver exited")))
        for pg in list(self.pgs.values()):
            if pg.job == job and not pg.detached:
                self._on_rm_pg(None, pg.pgid)

    def _node_dead(self, node) -> None:
        """A raylet's connection closed: its workers are dead (their tasks retried elsewhere) and objects
        whose only copy was in its arena become ObjectLostError (no lineage to recompute them). Placement-
        group bundles on it are not moved: tasks aimed at them wait."""
        node.alive = False
        _log(f"head: node {node.nid} ({node.info['ip']}) is gone")
        for w in [w for w in self.workers.values() if w.node is node]:
            self._worker_dead(w, "its node died")
        for off, (_, owner) in list(node.allocs.items()):  # copies to it never report "pulled": end them (unpin)
            if type(owner) is tuple:
                self._on_pulled(None, owner[1], node.nid, off, "its node died")
        for oid, o in list(self.objects.items()):  # an object with a copy on a live node just loses a location
            if o.locs.pop(node.nid, None) and not o.locs and o.desc is None:
                o.desc = _error_desc(ObjectLostError(f"object {oid}: its only copy was on node {node.nid}, which died"))
                self._notify(oid, o)

    # -- placement groups
    # A created group moves resources from node pools into bundle pools (one _Pool per bundle); tasks placed
    # in the group take from the bundle, everything else from what the nodes have left. Removal gives the
    # bundles back to the nodes. Reservation is all-or-nothing within one loop turn: no other event can
    # interleave, so there is no partial state to roll back across messages (Ray needs two phases for that).
    def _on_pg(self, peer, pgid, bundles, strategy, value, detached) -> None:
        """placement_group(): record it and its ready object (pending until placed), then try to place it."""
        self.pgs[pgid] = _PG(pgid, bundles, strategy, value, detached, self._job(peer))
        self._new_obj(pgid + ".ready", None).pins = 1  # lives as long as the group
        self._schedule()

    def _place_pg(self, pg) -> None:
        """Reserve every bundle or none. PACK: one node if possible, else as few as possible;
        SPREAD: distinct nodes if possible; STRICT_*: exactly that, or wait."""
        # taken: [(node, alloc)] per bundle, in bundle order. Both passes are greedy first-fit, not a search:
        # FOOTGUN: a group can wait although another assignment of its bundles to nodes would fit now
        nodes, taken = [n for n in self.nodes.values() if n.alive], []
        for n in nodes if pg.strategy in ("PACK", "STRICT_PACK") else []:  # every bundle on one node
            taken = [(n, n.pool.take(b)) for b in pg.bundles]
            if all(a for _, a in taken):
                break
            for _, a in taken:  # this node cannot hold them all: undo, try the next
                if a:
                    n.pool.give(a)
            taken = []
        # bundle by bundle over nodes: PACK prefers nodes already used by this group, SPREAD unused ones,
        # STRICT_SPREAD allows only unused ones; one bundle that fits nowhere undoes the whole group
        if not taken and pg.strategy != "STRICT_PACK":
            used = set()
            for b in pg.bundles:
                cands = sorted(nodes, key=lambda n: (n.nid in used) != (pg.strategy == "PACK"))
                if pg.strategy == "STRICT_SPREAD":
                    cands = [n for n in nodes if n.nid not in used]
                got = next(((n, a) for n in cands for a in [n.pool.take(b)] if a), None)
                if got is None:
                    for n, a in taken:
                        n.pool.give(a)
                    taken = []
                    break
                taken.append(got)
                used.add(got[0].nid)
        if not taken:
            if pg.pgid not in self.warned and any(not any(all(n.total.get(k, 0) >= v for k, v in b.items())
                                                          for n in nodes) for b in pg.bundles):
                self.warned.add(pg.pgid)
                _log(f"head: placement group {pg.pgid} asks for bundles larger than any node; it waits")
            return
        pg.state = "created"
        # each bundle's pool holds exactly what was taken for it, GPU device indices included
        pg.nodes, pg.pools = [n for n, _ in taken], [_Pool(a[0], a[1]) for _, a in taken]
        oid = pg.pgid + ".ready"
        self._seal(oid, self.objects[oid], ("inline", pg.value), (), None, None)

    def _on_rm_pg(self, peer, pgid) -> None:
        """remove_placement_group() (or the end of its job): kill what runs in the group, give the bundles back."""
        pg = self.pgs.pop(pgid, None)
        if pg is None:
            return
        # Ray's rule: its actors die, its running tasks fail and their processes are killed (below), its queued
        # tasks fail when _place meets them
        for a in list(self.actors.values()):  # (a list: _actor_dead may _forget)
            s = a.spec.opts["strategy"]
            if s and s[0] == "pg" and s[1] == pgid and a.state != "dead":
                self._actor_dead(a, "its placement group was removed")
        # a killed process runs on until the kill lands (a message away on another node), so the resources come
        # back in two steps and the node is never oversubscribed: each bundle's free part now, each worker's
        # share when its process is seen dead (_release_worker gives to w.pool: now its node's pool)
        for w in [w for w in self.workers.values() if w.pool in pg.pools]:  # (pools compare by identity)
            w.pool = w.node.pool
            if w.task is not None:  # "leaving": _release_worker never makes it idle, so no task is given to it
                self._fail(w.task, _error_desc(RayError(f"{w.task.name}: placement group {pgid} was removed")))
                w.state = "leaving"
                self._node_call(w.node, "kill", w.wid)
        for n, p in zip(pg.nodes, pg.pools):  # (none while the group was pending)
            n.pool.give((p.free, p.gpus))
        pg.state, oid = "removed", pgid + ".ready"
        if self.objects[oid].state == "pending":  # never placed: get(pg.ready()) raises instead of waiting forever
            err = _error_desc(RayError(f"placement group {pgid} was removed"))
            self._seal(oid, self.objects[oid], err, (), None, None)
        self._unpin(oid)
        self._schedule()

    # -- queries and shutdown
    def _on_rpc(self, peer, req, name, args) -> None:
        """A request that expects a reply: run _rpc_<name>; its exception travels back and is raised there."""
        try:
            value = getattr(self, "_rpc_" + name)(peer, *args)
        except Exception as e:  # the caller raises it
            value = e
        self._send(peer, ("reply", req, value))

    def _rpc_resources(self, peer, which):
        out = Counter()
        for n in self.nodes.values():
            if n.alive:
                out.update(n.total if which == "total" else n.pool.free)
        return {k: v / UNIT for k, v in out.items() if v > 0}

    def _rpc_nodes(self, peer):
        return [{"NodeID": n.nid, "Alive": n.alive, "NodeManagerAddress": n.info["ip"],
                 "Resources": {k: v / UNIT for k, v in n.total.items() if v}} for n in self.nodes.values()]

    def _rpc_status(self, peer):
        running = Counter(w.task.name for w in self.workers.values() if w.task is not None)
        queued = Counter(t.name for q in self.queues.values() for t in q if not t.done)
        inline = [o.size for o in self.objects.values() if o.desc is not None]
        return {"address": self.address,
                "nodes": [{"id": n.nid, "ip": n.info["ip"], "alive": n.alive, "total": n.total, "free": n.pool.free,
                           "workers": sum(w.node is n for w in self.workers.values()),
                           "store_used": n.alloc.size - n.alloc.free_bytes(), "store_size": n.alloc.size,
                           "store_objects": sum(n.nid in o.locs for o in self.objects.values())}
                          for n in self.nodes.values()],
                "actors": [{"id": a.aid, "class": a.spec.name, "name": a.spec.opts["name"], "state": a.state,
                            "pid": a.worker.pid if a.worker else None} for a in self.actors.values()],
                "running": dict(running), "queued": dict(queued), "inline_objects": len(inline),
                "inline_bytes": sum(inline), "objects": len(self.objects)}

    def _rpc_shutdown(self, peer):
        """The driver that started this cluster leaves: the loop ends after this turn (the reply may be lost
        with the socket; the driver does not wait for it past its timeout)."""
        self.stopping = True

    def _shutdown(self) -> None:
        """Stop the raylets, this machine's workers and arena, then close every socket."""
        for n in self.nodes.values():
            if n.conn is not None and n.alive:
                self._send(n.conn, ("node", "shutdown", ()))
                n.conn.sock.setblocking(True)  # this once, wait for the kernel to take the last frames
                self._flush(n.conn)  # (one send(); a raylet that misses it stops anyway at the EOF that follows)
        self.local.shutdown()
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.wake_w.close()


def _desc_text(desc) -> str:
    """The message of an error descriptor (for the errors of actors that could not start). It unpickles the
    user's exception IN THE HEAD, which may not import its class: then a line that says so, not a crash."""
    try:
        return str(_loads(memoryview(bytearray(desc[1]))))
    except Exception as e:  # noqa: BLE001 (any unpickling failure)
        return f"(an error the head cannot rebuild: {type(e).__name__}: {e})"


def _fmt_res(units: dict) -> str:
    return " ".join(f"{k}={v / UNIT:g}" for k, v in sorted(units.items()) if v) or "-"


# ---- node manager (head and raylets), raylet, worker ----------------------------------------------
# Per machine, one _NodeManager does the local chores the head cannot do from afar: start and kill worker
# processes (with the GPUs they were given), own the arena file, and serve/fetch arena regions to/from
# other machines. On the head's machine it lives inside the head process; elsewhere it is the heart of a
# *raylet* process, which is just a manager plus a _Client loop that runs the head's ("node", method, args)
# commands. Ray's raylet also schedules and leases workers; here all decisions stay in the head.
#   Process lifetimes, so nothing outlives its parent (a leaked process holds GPUs, a leaked arena holds
# RAM): every child that must die with its parent (workers, the head that init() starts) gets a pipe on
# stdin and watches it (_lifeline): the parent's death, however it happens (even kill -9), closes the pipe,
# and the child exits. The arena is removed by a *janitor* child waiting on the same kind of pipe, since a
# killed node cannot clean up after itself. (Nodes made by `start` are daemons: `stop` ends them.)
#   A worker is a loop over the messages the head sends it: exec (run a task, reply "done"), create
# (become an actor), call (run an actor method, in order, on threads, or on an event loop), bind (add the
# driver's sys.path). Workers start as fresh interpreters (subprocess, never fork: CUDA and threads do not
# survive a fork) that import this file as the module `nanoray`.

def _boot(entry: str) -> str:
    """The -c program of a head, raylet or worker. Each process would otherwise compile this file again
    when bytecode writing is off (PYTHONDONTWRITEBYTECODE): cache it outside the repo instead."""
    cache = os.path.join(STATE_DIR, "pycache")
    return (f"import sys; sys.dont_write_bytecode = False; sys.pycache_prefix = {cache!r}; "
            f"sys.path.insert(0, {HERE!r}); import nanoray; nanoray.{entry}()")


class _NodeManager:
    """What one machine does for the cluster: spawn and kill its workers (fresh interpreters, their
    CUDA_VISIBLE_DEVICES set from the GPUs they got), own its arena, serve arena regions to other
    nodes and fetch theirs. Events (a worker exited, a transfer finished) go to `report`."""

    def __init__(self, nid, head_address, secret, cfg, host, report):
        self.nid, self.head_address, self.secret, self.cfg, self.report = nid, head_address, secret, cfg, report
        # self.gpus: index -> physical id string (what CUDA_VISIBLE_DEVICES needs); the head only sees indices
        self.procs, self.gpus = {}, _node_gpus(cfg.get("num_gpus"))
        for stale in os.listdir(SHM_DIR):  # our arenas whose node died without its janitor (kill -9 of both)
            pid, path = stale.split("_")[1] if stale.startswith("nanoray_") else "", os.path.join(SHM_DIR, stale)
            with suppress(OSError):
                if pid.isdigit() and not _alive(int(pid)) and os.stat(path).st_uid == os.getuid():
                    os.unlink(path)
        size, st = cfg.get("object_store_memory"), os.statvfs(SHM_DIR)
        if not size:  # 30% of RAM (Ray's default), at most 80% of what /dev/shm has free
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            size = int(min(0.3 * ram, 0.8 * st.f_bavail * st.f_frsize)) // PAGE * PAGE
        # the pid in the name lets a later node tell a dead node's arena (above) from a live one's
        self.arena = _Arena(os.path.join(SHM_DIR, f"nanoray_{os.getpid()}_{nid}"), size, create=True)
        # the janitor: removes the arena when this process dies, however it dies. Its stdin is a pipe whose only
        # write end we hold: read() returns at EOF, i.e. when we are gone. Its own session: a Ctrl-C sent to
        # our process group does not kill it before it has done its one job.
        self.janitor = subprocess.Popen(
            [sys.executable, "-S", "-c", "import os, sys; sys.stdin.buffer.read(); os.path.exists(sys.argv[1]) and "
             "os.unlink(sys.argv[1])", self.arena.path], stdin=subprocess.PIPE, start_new_session=True)
        # the object server (any free port, announced in info()): other nodes pull arena regions from it
        self.server = socket.create_server((host, 0))
        threading.Thread(target=self._serve, daemon=True).start()

    def info(self) -> dict:
        """What the head needs to know about this machine (sent in the raylet's hello)."""
        host, port = self.server.getsockname()[:2]
        return {"nid": self.nid, "ip": host, "host": socket.gethostname(), "objects": f"{host}:{port}",
                "arena": self.arena.path, "arena_size": self.arena.size, "num_gpus": len(self.gpus),
                "num_cpus": self.cfg.get("num_cpus") if self.cfg.get("num_cpus") is not None else os.cpu_count(),
                "resources": {k: _units(v, k) for k, v in (self.cfg.get("resources") or {}).items()}}

    def spawn(self, wid, gpus) -> None:
        """Start worker `wid` (it connects to the head by itself and says hello with that id). gpus: indices
        into self.gpus. FOOTGUN: a worker given no GPU keeps this node's CUDA_VISIBLE_DEVICES, so a num_gpus=0
        task can still see, and allocate memory on, every GPU of the machine."""
        env = dict(os.environ, NANORAY_ADDRESS=self.head_address, NANORAY_WORKER_ID=wid, NANORAY_NODE_ID=self.nid)
        env.pop("NANORAY_CONFIG", None)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = env["NANORAY_GPU_IDS"] = ",".join(self.gpus[i] for i in gpus)
        # stdin=PIPE: the worker's lifeline to us. Popen returns as soon as the process exists: the imports and
        # the hello happen while the head goes on with other work
        self.procs[wid] = subprocess.Popen([sys.executable, "-c", _boot("_worker_main")], env=env,
                                           stdin=subprocess.PIPE, start_new_session=True)

    def kill(self, wid) -> None:
        """SIGKILL, no grace period: the head has already written off whatever the worker was doing."""
        p = self.procs.get(wid)
        if p is not None and p.poll() is None:
            p.kill()

    def poll(self) -> None:
        """Report workers that exited (called every ~0.1 s: by the head's loop, or the raylet's)."""
        for wid, p in list(self.procs.items()):
            if p.poll() is not None:
                del self.procs[wid]
                self.report(("worker_exit", wid, p.returncode))

    def _serve(self) -> None:
        """The object server's accept loop: one thread per transfer (transfers are few and large)."""
        while True:
            try:
                sock, addr = self.server.accept()
            except OSError:  # the server socket was closed: shutdown
                return
            threading.Thread(target=self._serve_one, args=(sock, addr), daemon=True).start()

    def _serve_one(self, sock, addr) -> None:
        """Send one region: handshake, then (offset, size) in, raw bytes out. The head pinned the object for
        the transfer, so the region cannot be freed or reused while we send it."""
        try:
            _tune(sock)
            sock.settimeout(AUTH_TIMEOUT)
            _auth_server(sock, self.secret)
            sock.settimeout(60)
            off, size = struct.unpack("<QQ", _recv_exact(sock, 16))
            if off + size > self.arena.size:
                raise ValueError(f"region {off}+{size} is outside the arena")
            # from the shared mapping (no copy in user space), in 64 MiB pieces: sendall's timeout bounds its
            # WHOLE send (Python >= 3.5), so 60 s is a limit on a stall, not on a big object over a slow link
            for a in range(off, off + size, 1 << 26):
                sock.sendall(self.arena.mv[a:min(a + (1 << 26), off + size)])
        except (OSError, ConnectionError, ValueError) as e:
            _log(f"object server: refused {addr[0]}:{addr[1]}: {e}")
        finally:
            sock.close()

    def pull(self, oid, src, src_off, size, dst_off) -> None:
        """Copy a region of node `src`'s arena (its object server's HOST:PORT) into ours at dst_off, on a
        thread; report ("pulled", ..., error or None) to the head either way."""
        def run():
            err = None
            try:
                with _connect(src, self.secret) as sock:
                    sock.settimeout(60)
                    sock.sendall(struct.pack("<QQ", src_off, size))
                    view, got = self.arena.mv[dst_off:dst_off + size], 0
                    while got < size:  # straight into our arena: one copy per transfer
                        n = sock.recv_into(view[got:])
                        if not n:
                            raise ConnectionError("the source closed the transfer early")
                        got += n
            except (OSError, ConnectionError) as e:
                err = str(e)
            self.report(("pulled", oid, self.nid, dst_off, err))
        threading.Thread(target=run, daemon=True).start()

    def shutdown(self) -> None:
        """Kill the workers and wait for them (no zombie keeps a GPU), close the server, remove the arena,
        and release the janitor (its pipe's EOF; the file it would remove is already gone)."""
        for p in self.procs.values():
            p.kill()
        for p in self.procs.values():
            p.wait()
        self.server.close()
        self.arena.close()
        os.unlink(self.arena.path)
        self.janitor.stdin.close()
        self.janitor.wait()


def _lifeline(then) -> None:
    """Block until stdin (a pipe from the parent) reaches EOF, i.e. the parent died, then call then()."""
    # no polling and no pid checks: the kernel closes a dead process's pipe ends, so EOF is exact and instant
    while os.read(0, 4096):
        pass
    then()


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 checks without sending; EPERM: it exists, not ours)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _node_main() -> None:
    """Entry of a head or raylet process (started by init() or by `start`)."""
    cfg = json.loads(os.environ.pop("NANORAY_CONFIG"))
    secret = os.environ["NANORAY_SECRET"].encode()
    host = cfg.get("host") or "127.0.0.1"
    if cfg["head"]:
        listen = socket.socket(fileno=cfg["listen_fd"]) if cfg.get("listen_fd") else \
            socket.create_server((host, cfg["port"]))
        node = _Head(cfg, listen, secret)
        # a signal handler (or the lifeline thread) only posts: the stop itself happens on the loop thread
        stop = lambda *_: node.post(lambda: setattr(node, "stopping", True))  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        if cfg.get("lifeline"):  # started by init(): live as long as the driver
            threading.Thread(target=_lifeline, args=(stop,), daemon=True).start()
        address, run = node.address, node.loop
    else:  # a raylet: a node manager driven by the head's ("node", method, args) messages
        nid = os.urandom(4).hex()
        mgr = _NodeManager(nid, cfg["address"], secret, cfg, host, report=None)
        client = _Client(cfg["address"], secret, {"kind": "node", **mgr.info()})
        # reports come from transfer threads as well as this one: client.send is thread-safe (send_lock)
        mgr.report, address = client.send, cfg["address"]
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit unwinds through run()'s finally

        def run():  # one thread reads commands; a 0.1 s timeout lets it also reap exited workers
            try:
                while True:
                    msg = client.next_message(timeout=0.1)
                    if msg is not None:
                        if msg[1] == "shutdown":
                            break
                        getattr(mgr, msg[1])(*msg[2])
                    mgr.poll()
            except RaySystemError:
                _log(f"raylet {nid}: lost the head at {cfg['address']}; stopping")
            finally:
                mgr.shutdown()
    if cfg.get("pidfile"):  # `start` waits for it: written whole (a temp name, then a rename)
        with open(cfg["pidfile"] + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "address": address, "head": cfg["head"]}, f)
        os.replace(cfg["pidfile"] + ".tmp", cfg["pidfile"])
    try:
        run()
    finally:
        if cfg.get("pidfile") and os.path.exists(cfg["pidfile"]):
            os.unlink(cfg["pidfile"])
    sys.stderr.flush()
    os._exit(0)  # everything is cleaned up: skip the interpreter's teardown


def _worker_main() -> None:
    """A worker: run what the head sends, in order (or on threads / an event loop for actors that
    allow concurrency); results go back as ("done", task id, [(return id, descriptor, refs)], failed)."""
    global _client
    threading.Thread(target=_lifeline, args=(lambda: os._exit(1),), daemon=True).start()  # the node died
    # the module-level _client: ObjectRefs unpickled in this process count through it, and tasks may call
    # get/put/remote themselves (nested tasks), exactly like a driver
    c = _client = _Client(os.environ["NANORAY_ADDRESS"], os.environ["NANORAY_SECRET"].encode(),
                          {"kind": "worker", "wid": os.environ["NANORAY_WORKER_ID"], "pid": os.getpid()})
    # fns: pickled function bytes -> function (one unpickle per distinct function, however many tasks);
    # instance/run: set once by "create" when this worker becomes an actor
    fns, instance, run = {}, None, None
    while True:  # the main thread is the only consumer of the inbox: work arrives in the order the head sent it
        try:
            msg = c.next_message()
        except RaySystemError:
            os._exit(0)  # the head is gone
        op = msg[0]
        if op == "bind":  # the driver's sys.path, so its own modules import here too
            sys.path.extend(p for p in msg[1] if p not in sys.path)
        elif op == "exec":
            _, tid, blob, name, args, deps, rids, retry_on = msg

            def call(blob=blob, args=args, deps=deps):  # a function that cannot load fails its task, readably
                fn = fns.get(blob) or fns.setdefault(blob, _loads(memoryview(bytearray(blob))))
                a, kw = c.resolve_args(args, deps)
                return fn(*a, **kw)
            c.in_task = True  # (a get() inside the task now lends its CPU back while it waits)
            retry = retry_on and (fns.get(retry_on) or fns.setdefault(retry_on, _loads(memoryview(bytearray(
                retry_on)))))      # retry_exceptions=[classes], loaded once per distinct list like functions
            _run_call(c, tid, name, rids, call, retry)  # runs on this thread: one task at a time per worker
            c.in_task = False
        elif op == "create":
            _, aid, blob, name, args, deps, opts = msg
            try:
                a, kw = c.resolve_args(args, deps)
                instance, err = _loads(memoryview(bytearray(blob)))(*a, **kw), None
            except Exception as e:  # the head marks the actor dead with this error; no call will come
                exc = RayTaskError(f"{name}.__init__", _format_tb(e), e, os.getpid())
                err = (_error_desc(exc), str(exc))    # the text too: the head may not import the cause's class
            run = _actor_runner(c, instance, opts)
            c.send(("created", aid, err))
        elif op == "call":  # returns at once for threaded and async actors: the loop keeps reading
            run(*msg[1:])


def _format_tb(e) -> str:
    """The traceback text without its first frame (the nanoray function that caught the exception)."""
    return "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))


def _run_call(c, tid, name, rids, call, retry_on=None) -> None:
    """Run call() (load the function, resolve the arguments, run it), store each return, report "done".
    Any exception, in the user's code or in loading/storing, becomes an error object for every return.
    failed: the head may retry it (retry_exceptions); with a list of classes (retry_on) only those."""
    results, what = [], name
    try:
        out = call()
        values = [out] if len(rids) == 1 else list(out)
        if len(values) != len(rids):
            raise ValueError(f"{name} returned {len(values)} values, num_returns={len(rids)}")
        for i, (r, v) in enumerate(zip(rids, values)):
            what = f"{name} (storing return {i} of {len(rids)})"  # a store error (full, unpicklable) says which
            results.append((r, *c.store(v)))
        failed = False
    except Exception as e:
        if results:  # returns stored before the failing one hold regions no "done" will seal: give them back
            c.send(("unalloc", [d[1] for _, d, _ in results if d[0] == "shm"]))  # (else: until the worker exits)
        err = _error_desc(RayTaskError(what, _format_tb(e), e, os.getpid()))
        # matched by name: a class of the driver's __main__ ships by value, so the list's copy is not the
        # function's copy of the same class (isinstance would say no)
        names = {(k.__module__, k.__qualname__) for k in type(e).__mro__}
        results, failed = [(r, err, ()) for r in rids], not retry_on or any(
            (k.__module__, k.__qualname__) in names for k in retry_on)
    c.send(("done", tid, results, failed))


def _actor_runner(c, instance, opts):
    """How an actor runs its calls: in order on this thread; on a thread pool (max_concurrency > 1);
    or as coroutines on an event loop thread (async methods), at most max_concurrency at once."""
    def body(tid, name, args, deps):
        a, kw = c.resolve_args(args, deps)
        return getattr(instance, name)(*a, **kw)  # an async method returns its coroutine here, not run yet
    # async actor: one event loop on its own thread runs the coroutines; argument resolution, sync methods
    # and result storage run on the loop's default thread pool, because they may block (get, rpc "alloc"),
    # and a blocked event loop would stall every other coroutine of the actor
    if opts["is_async"]:
        import asyncio
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        sem = asyncio.Semaphore(opts["max_concurrency"])

        async def acall(tid, name, args, deps):
            async with sem:  # body on a helper thread: resolving the arguments may block in get()
                out = await loop.run_in_executor(None, body, tid, name, args, deps)
                return (await out) if inspect.isawaitable(out) else out

        def run(tid, name, args, deps, rids):  # the result is stored on a helper thread too: store() may block
            # called on the main thread: hand the coroutine to the loop thread; when it ends, _run_call gets
            # f.result as its `call`, which returns the value or re-raises the method's exception
            fut = asyncio.run_coroutine_threadsafe(acall(tid, name, args, deps), loop)
            fut.add_done_callback(lambda f: loop.run_in_executor(None, _run_call, c, tid, name, rids, f.result))
        return run
    # threaded actor: up to max_concurrency calls at once, so they may finish out of order and the instance
    # must be thread-safe (FOOTGUN: nothing here locks it for you)
    if opts["max_concurrency"] > 1:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(opts["max_concurrency"])
        return lambda tid, name, args, deps, rids: pool.submit(
            _run_call, c, tid, name, rids, lambda: body(tid, name, args, deps))
    # the default: one call at a time, on the main thread, in the order the head sent them
    return lambda tid, name, args, deps, rids: _run_call(c, tid, name, rids, lambda: body(tid, name, args, deps))


# ---- CLI: start / stop / status, the self-test, the benchmark -------------------------------------
# A multi-machine cluster is started by hand, as with Ray: `start --head` on one machine, `start --address`
# on the others, each a background process (a daemon with its own session and a log file) that leaves a
# JSON pidfile in STATE_DIR; `stop` signals what those files name, and `init("auto")` finds the head there.
# The self-test and the benchmark are the executable spec: every public API once, and nanoray against the
# ray package measured in the same run.

def _opt(default, why):
    return field(default=default, metadata={"help": why})


@dataclass
class StartConfig:
    """`python nanoray.py start`: every flag, its default and why (argparse is generated from it)."""
    head: bool = _opt(False, "start the head of a new cluster (else join the one at --address)")
    address: str = _opt("", "HOST:PORT of the head to join")
    port: int = _opt(6379, "the head's port (Ray's default)")
    node_ip_address: str = _opt("127.0.0.1", "the address this node binds and announces: loopback unless given")
    num_cpus: int = _opt(None, "worker slots (default: the machine's cores)")
    num_gpus: int = _opt(None, "GPUs to offer (default: CUDA_VISIBLE_DEVICES, else every GPU)")
    resources: str = _opt("{}", "custom resources as JSON, e.g. '{\"reward\": 4}'")
    object_store_memory: int = _opt(None, "arena bytes (default: 30%% of RAM)")
    secret_file: str = _opt("", "the secret file (default: $NANORAY_SECRET, else ~/.nanoray/secret)")
    block: bool = _opt(False, "run in the foreground instead of in the background")


def _pidfiles() -> list:
    """[(path, {"pid", "address", "head"})] of the nodes `start` ran on this machine (other files skipped)."""
    out = []
    for name in sorted(os.listdir(STATE_DIR)) if os.path.isdir(STATE_DIR) else []:
        try:
            with open(os.path.join(STATE_DIR, name)) as f:
                out.append((os.path.join(STATE_DIR, name), json.load(f)))
        except (OSError, ValueError):
            continue
    return out


def _local_head_address() -> str:
    """init("auto"): the newest live head started on this machine."""
    heads = [d["address"] for _, d in _pidfiles() if d.get("head") and _alive(d["pid"])]
    if not heads:
        raise ConnectionError("address='auto': no nanoray head runs on this machine (`python nanoray.py start --head`)")
    return heads[-1]


def _start(cfg: StartConfig) -> None:
    """`start`: check everything that can fail readably here, then start the node in the background and wait
    (at most 30 s) until it listens, so a printed "started" means it is up."""
    if cfg.head == bool(cfg.address):
        raise ValueError("start: give exactly one of --head or --address HOST:PORT")
    try:
        resources = dict(json.loads(cfg.resources))
    except (ValueError, TypeError):
        raise ValueError(f"--resources {cfg.resources!r}: expected a JSON object such as '{{\"reward\": 4}}'") from None
    if cfg.head and not os.environ.get("NANORAY_SECRET") and not os.path.exists(cfg.secret_file or SECRET_FILE):
        path = cfg.secret_file or SECRET_FILE  # a first head on this machine makes the secret
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(os.urandom(32).hex())
    secret = _load_secret(cfg.secret_file or None)
    node = dict(asdict(cfg), host=cfg.node_ip_address, resources=resources)
    if not cfg.head:
        _Client(cfg.address, secret, {"kind": "cli"}).sock.close()  # fail here, readably, if unreachable
    os.environ["NANORAY_SECRET"] = secret.decode()  # the node reads it from its environment
    if cfg.block:
        os.environ["NANORAY_CONFIG"] = json.dumps(node)
        return _node_main()
    stem = os.path.join(STATE_DIR, f"node-{time.time_ns()}")
    node["pidfile"], log = stem + ".json", stem + ".log"
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    env = dict(os.environ, NANORAY_CONFIG=json.dumps(node))
    with open(log, "ab") as logf:  # a daemon: its own session, output to the log, no terminal
        proc = subprocess.Popen([sys.executable, "-c", _boot("_node_main")], stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=logf, start_new_session=True, env=env)
    deadline = time.monotonic() + 30
    while not os.path.exists(node["pidfile"]):  # written once the node listens
        if proc.poll() is not None:
            with open(log, errors="replace") as f:
                last = ([ln.strip() for ln in f if ln.strip()] or ["no output"])[-1]
            raise OSError(f"start: the node exited with code {proc.returncode}: {last} (log: {log})")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"start: the node did not come up within 30 s; see {log}")
        time.sleep(0.05)
    with open(node["pidfile"]) as f:
        ready = json.load(f)["address"]
    print(f"nanoray {'head' if cfg.head else 'node'} started (pid {proc.pid}) at {ready}; log {log}")
    if cfg.head:
        print(f"join with: python nanoray.py start --address {ready}   (same secret: NANORAY_SECRET or "
              f"{cfg.secret_file or SECRET_FILE})\nstop with: python nanoray.py stop")


def _stop() -> None:
    """`stop`: SIGTERM every node of this machine, SIGKILL after 10 s (their janitors still clean up)."""
    found = _pidfiles()
    for path, d in found:
        if _alive(d["pid"]):
            os.kill(d["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    for path, d in found:
        while _alive(d["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(d["pid"]):
            os.kill(d["pid"], signal.SIGKILL)  # its janitor still removes the arena
        if os.path.exists(path):
            os.unlink(path)
        print(f"stopped {'head' if d.get('head') else 'node'} pid {d['pid']} ({d['address']})")
    if not found:
        print("no nanoray node was running on this machine")


def _status(address: str) -> None:
    c = _Client(address or _local_head_address(), _load_secret(), {"kind": "cli"})
    s = c.rpc("status")
    c.sock.close()
    print(f"nanoray cluster at {s['address']}: {len(s['nodes'])} node(s), {len(s['actors'])} actor(s), "
          f"{s['objects']} object(s)")
    for n in s["nodes"]:
        print(f"  node {n['id']} {n['ip']} {'alive' if n['alive'] else 'DEAD'}: total {_fmt_res(n['total'])}; "
              f"free {_fmt_res(n['free'])}; {n['workers']} workers; store {n['store_used'] / 1e6:.1f} of "
              f"{n['store_size'] / 1e6:.0f} MB in {n['store_objects']} objects")
    for a in s["actors"]:
        print(f"  actor {a['id']} {a['class']}{' ' + repr(a['name']) if a['name'] else ''}: {a['state']}, "
              f"pid {a['pid']}")
    print(f"  tasks running: {s['running'] or 'none'}; queued: {s['queued'] or 'none'}")
    print(f"  small objects in the head: {s['inline_objects']} ({s['inline_bytes'] / 1e3:.1f} kB)")


def selftest() -> None:
    """Every API once on a local 2-CPU cluster with 2 declared GPUs (placement is bookkeeping: no
    CUDA needed), then checks that shutdown removed its arena (test_all also checks for processes left)."""
    t0 = time.time()
    init(num_cpus=2, num_gpus=2)
    arena = _client.info["arena"]     # this cluster's (other clusters of this machine have their own)
    try:
        @remote
        def add(a, b):
            return a + b

        @remote(num_returns=2, num_gpus=0.5)
        def split(x):
            return x, os.environ.get("CUDA_VISIBLE_DEVICES")

        @remote
        def boom():
            raise KeyError("boom")

        @remote(max_restarts=1)
        class Counter:
            def __init__(self, start):
                self.n = start

            def incr(self, k=1):
                self.n += k
                return self.n

            def pid(self):
                return os.getpid()
        x = put(20)
        assert get(add.remote(x, add.remote(1, 1))) == 22, "refs as arguments resolve before the call"
        v, gpu = get(split.remote(5))
        assert v == 5 and gpu in ("0", "1"), gpu
        ready, rest = wait([add.remote(i, i) for i in range(4)], num_returns=4, timeout=30)
        assert sorted(get(ready)) == [0, 2, 4, 6] and not rest
        try:
            get(boom.remote())
            raise AssertionError("the remote KeyError must come back")
        except KeyError as e:  # also a RayTaskError, with the remote traceback
            assert isinstance(e, RayTaskError) and "raise KeyError" in str(e), str(e)
        c = Counter.remote(10)
        assert get([c.incr.remote() for _ in range(3)]) == [11, 12, 13], "calls run in order"
        os.kill(get(c.pid.remote()), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # the actor restarts (state lost): calls fail until the head has seen the death
            try:
                assert get(c.incr.remote(), timeout=30) == 11
                break
            except RayActorError:
                assert time.monotonic() < deadline, "the actor did not restart"
        try:
            import numpy as np
            big = np.arange(4_000_000, dtype=np.float32)
            back = get(put(big))
            assert back.ctypes.data != big.ctypes.data and (back == big).all()
            print("  numpy 16 MB array: zero-copy view of the arena OK")
        except ImportError:
            print("  numpy zero-copy check: SKIPPED (numpy is not installed)")
        pg = util.placement_group([{"CPU": 1}, {"GPU": 1}], strategy="PACK")
        get(pg.ready(), timeout=30)
        strat = util.scheduling_strategies.PlacementGroupSchedulingStrategy(pg, 1)
        assert get(split.options(scheduling_strategy=strat, num_cpus=0).remote(1))[0] == 1
        try:
            get(remote(time.sleep).remote(3), timeout=0.2)
            raise AssertionError("get(timeout=0.2) on a 3 s task must time out")
        except GetTimeoutError:
            pass
        assert cluster_resources()["CPU"] == 2.0 and available_resources().get("GPU", 0) <= 1.0
    finally:
        shutdown()
    assert not os.path.exists(arena), f"shutdown left the arena {arena}"
    print(f"nanoray selftest: OK ({time.time() - t0:.1f} s)")


def _bench_noop():
    return None


class _BenchActor:
    def __init__(self, system):
        self.ray = importlib.import_module(system)

    def noop(self):
        return None

    def get_ms(self, refs):  # the ref arrives nested in a list, so this process does the get (best of 5)
        return min(_timed(lambda: self.ray.get(refs[0])) for _ in range(5)) * 1e3


def _timed(fn, n=1):
    """The one timer: seconds per call of fn() (n calls, after the caller's warm-up)."""
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def _bench_system(ray, mb: int) -> dict:
    import numpy as np
    out, kw = {}, ({"include_dashboard": False, "logging_level": "ERROR"} if ray.__name__ == "ray" else {})
    out["init (s)"] = _timed(lambda: ray.init(num_cpus=2, **kw))
    f, actor = ray.remote(_bench_noop), ray.remote(_BenchActor).remote(ray.__name__)
    ray.get([f.remote() for _ in range(50)] + [actor.noop.remote()])  # warm-up: workers up, code loaded
    out["sync task round trips (/s)"] = 1 / _timed(lambda: ray.get(f.remote()), 300)
    out["1000 async tasks (/s)"] = 1000 / _timed(lambda: ray.get([f.remote() for _ in range(1000)]))
    out["sync actor calls (/s)"] = 1 / _timed(lambda: ray.get(actor.noop.remote()), 500)
    out["1000 async actor calls (/s)"] = 1000 / _timed(lambda: ray.get([actor.noop.remote() for _ in range(1000)]))
    arr = np.full(mb * 10**6 // 8, 1.0)
    refs = []
    out[f"put {mb} MB, first (GB/s)"] = arr.nbytes / 1e9 / _timed(lambda: refs.append(ray.put(arr)))
    refs.clear()  # freed: the next put may reuse the pages (warm)
    time.sleep(0.5)
    out[f"put {mb} MB, again (GB/s)"] = arr.nbytes / 1e9 / _timed(lambda: refs.append(ray.put(arr)))
    out[f"get {mb} MB, same process (ms)"] = min(_timed(lambda: ray.get(refs[0])) for _ in range(5)) * 1e3
    small = ray.put(np.full(10**6, 1.0))
    out["get 8 MB, other process (ms)"] = ray.get(actor.get_ms.remote([small]))
    out[f"get {mb} MB, other process (ms)"] = ray.get(actor.get_ms.remote([refs[0]]))
    refs.clear()
    small = actor = None  # noqa: F841 (dropped before shutdown)
    out["shutdown (s)"] = _timed(ray.shutdown)
    return out


def bench(mb: int = 800, systems=("nanoray", "ray")) -> dict:
    """`python nanoray.py --bench`: nanoray and the ray package on the same machine, one table."""
    load0, results = os.getloadavg(), {}
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    for name in systems:
        try:
            mod = sys.modules[__name__] if name == "nanoray" else importlib.import_module(name)
        except ImportError:
            print(f"{name}: SKIPPED (pip install {name})")
            continue
        results[name] = _bench_system(mod, mb)
        results[name]["init + shutdown (s)"] = results[name]["init (s)"] + results[name]["shutdown (s)"]
    lower = {"init (s)", "shutdown (s)", "init + shutdown (s)"} | {k for k in results.get("nanoray", {}) if "(ms)" in k}
    targets = {"init + shutdown (s)": "<= 0.5", "sync task round trips (/s)": ">= 1.0x ray",
               "1000 async tasks (/s)": ">= 1.0x ray", "sync actor calls (/s)": ">= 1.0x ray",
               "1000 async actor calls (/s)": ">= 1.0x ray", f"put {mb} MB, again (GB/s)": ">= 2",
               f"get {mb} MB, other process (ms)": "~ the 8 MB get (zero-copy)"}
    print(f"{'metric':34s} {'nanoray':>10s} {'ray':>10s} {'ratio':>7s}  target")
    for k, ours in results.get("nanoray", {}).items():
        peer = results.get("ray", {}).get(k)
        ratio = "" if peer is None or not ours else f"{(peer / ours if k in lower else ours / peer):7.2f}"
        print(f"{k:34s} {ours:10.3f} {'-' if peer is None else f'{peer:10.3f}':>10s} {ratio:>7s}  {targets.get(k, '')}")
    print(f"ratio > 1: nanoray is better. load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} cores)")
    return results


def main(argv=None) -> int:
    import argparse
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    p = argparse.ArgumentParser(prog="nanoray.py", description=__doc__.strip().split("\n")[0],
                                epilog="with no command: the self-test")
    p.add_argument("--bench", action="store_true", help="benchmark against the ray package (when installed)")
    p.add_argument("--mb", type=int, default=800, help="size of the large array in --bench")
    p.add_argument("--debug", action="store_true", help="full tracebacks for every error")
    sub = p.add_subparsers(dest="cmd")
    start = sub.add_parser("start", help="start a head or join a cluster")
    for f in fields(StartConfig):
        name, why = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            start.add_argument(name, action="store_true", dest=f.name, help=why)
        else:
            start.add_argument(name, type=f.type, default=f.default, dest=f.name, help=why)
    st = sub.add_parser("status", help="nodes, resources, actors, tasks, store use")
    st.add_argument("--address", default="", help="HOST:PORT of the head (default: the head on this machine)")
    sub.add_parser("stop", help="stop the nodes started on this machine")
    a = p.parse_args(argv)
    try:
        if a.cmd == "start":
            _start(StartConfig(**{f.name: getattr(a, f.name) for f in fields(StartConfig)}))
        elif a.cmd == "status":
            _status(a.address)
        elif a.cmd == "stop":
            _stop()
        elif a.bench:
            bench(a.mb)
        else:
            selftest()
    except (ValueError, OSError, TimeoutError) as e:  # expected errors: one line, exit 2
        if debug:
            raise
        print(f"nanoray.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import nanoray  # run as the module `nanoray`, so pickles name its classes the same in every process
    sys.exit(nanoray.main())

"""Per-session worker processes forked from a zygote: the server's loaded avatars shared copy-on-write.

Why processes: a session's renderer in a thread of the server shares the GIL with every other session's
renderer, the event loop, VP8 encoding and the mic's Whisper rows. Measured on 2 cores (bench/RESULTS.md,
"talkinghead serve", session 5): two GaussianFlameTalk sessions rendered 11.7 fps each, 23 together, no more
than one alone; the live mic repeated a third of its frames. Here each session's renderer, and the mic's live
feature stream (stateful: Whisper's KV cache), run in processes of their own.

Why forked from a zygote, not spawned: the issue asks for every avatar loaded once and shared by all sessions,
and for a vanished client's memory to be freed. A spawned process would load every avatar again (seconds per
session, the avatars' memory once more per process) or need every array moved to shared memory by hand. A
fork shares the parent's pages copy-on-write: the avatar's tensors, the training frames the poses replay, the
Whisper encoder and the Numba-compiled rasteriser are the parent's pages, read, never written; what a session
writes (its render state, each frame's buffers, the Python objects whose reference counts it touches) becomes
its own, and is returned to the system when the process exits -- when the session ends, however it ends.
Measured (session 6, 128² cpu-small avatars): a renderer process maps 845 MiB, 18-29 MiB of them its own; a
mic process 26 MiB of its own; two GaussianFlameTalk renderers render 89 FPS together (one: 39-43), and two
sessions 22.7 + 23.0 fps where threads rendered 11.7 + 11.6.

Why a zygote: forking a process that runs threads copies only the forking thread; a lock another thread held
at that instant (an allocator's, an interpreter's) stays locked in the child forever. The server's process runs
the event loop, the feature workers' manager, the sessions' producer threads. The zygote is forked once, when
the :class:`~talkinghead.serve.app.Server` is created (``talkinghead serve`` does it before any thread of
its own starts), stays single-threaded, and forks one child per request; ``gc.freeze()`` first, so that the
children's garbage collector does not write to (and so copy) every inherited object.

Not on a GPU: CUDA does not survive a fork; the server renders in threads there (GPU kernels run without the
GIL).

Protocol: :meth:`Zygote.spawn` sends ``(factory, args)`` and one end of a fresh socket pair to the zygote; the
child calls ``factory(registry, *args)`` (``registry``: what the zygote was given, e.g. the avatars by name),
answers with the attributes asked for, then serves method calls ``(name, args) -> result`` until the socket
closes. :class:`Child` is the caller's end; its calls are synchronous (the calling thread waits in a socket
read, without the GIL).
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import socket
import struct
import threading

_LEN = struct.Struct("!Q")


def _send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the other process closed its end")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket):
    return pickle.loads(_recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0]))


class ChildError(RuntimeError):
    """The child process raised (the message names the exception) or is gone."""


class Child:
    """The caller's end of one forked child: ``call(name, *args)`` runs ``obj.name(*args)`` there."""

    def __init__(self, sock: socket.socket, pid: int, info: dict):
        self.sock, self.pid, self.info = sock, pid, info
        self.lock = threading.Lock()
        self.closed = False

    def call(self, name: str, *args):
        with self.lock:
            if self.closed:
                raise ChildError(f"process {self.pid} was closed")
            try:
                _send(self.sock, (name, args))
                ok, value = _recv(self.sock)
            except (OSError, EOFError) as exc:
                raise ChildError(f"process {self.pid} is gone ({type(exc).__name__}: {exc})") from None
        if not ok:
            raise ChildError(f"process {self.pid}: {value}")
        return value

    def close(self) -> None:
        """End the child: it sees the socket close and exits (after the call it may be in)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in call()
        except OSError:
            pass
        self.sock.close()


def _child_main(sock: socket.socket, factory, args: tuple, attrs: tuple, registry) -> None:
    try:
        obj = factory(registry, *args)
        _send(sock, (True, {a: getattr(obj, a) for a in attrs}))
    except Exception as exc:
        _send(sock, (False, f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            name, a = _recv(sock)
        except (EOFError, OSError):
            return
        try:
            reply = (True, getattr(obj, name)(*a))
        except Exception as exc:  # the caller raises it; this process goes on serving
            reply = (False, f"{type(exc).__name__}: {exc}")
        try:
            _send(sock, reply)
        except OSError:
            return


def _zygote_main(sock: socket.socket, registry) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the system when they exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the server ends, then we see EOF
    gc.freeze()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, _LEN.size, 1)
            if not msg:
                return
            msg += _recv_exact(sock, _LEN.size - len(msg))
            factory, args, attrs = pickle.loads(_recv_exact(sock, _LEN.unpack(msg)[0]))
        except (EOFError, OSError):
            return
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _child_main(socket.socket(fileno=fds[0]), factory, args, attrs, registry)
            except BaseException:
                code = 1
            finally:
                os._exit(code)  # never the parent's atexit handlers or finalizers
        os.close(fds[0])
        sock.sendall(struct.pack("!q", pid))


class Zygote:
    """A process forked now from this one, holding ``registry``; :meth:`spawn` forks children of it."""

    def __init__(self, registry):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ours.close()
                _zygote_main(theirs, registry)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.sock, self.pid = ours, pid
        self.lock = threading.Lock()

    def spawn(self, factory, *args, attrs: tuple = ()) -> Child:
        """A new child running ``factory(registry, *args)``; ``attrs``: the object's attributes to send back
        at once (``Child.info``). ``factory`` must be picklable (a module-level function)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        data = pickle.dumps((factory, args, attrs), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self.lock:
                socket.send_fds(self.sock, [_LEN.pack(len(data))], [theirs.fileno()])
                self.sock.sendall(data)
                pid = struct.unpack("!q", _recv_exact(self.sock, 8))[0]
        except (OSError, EOFError) as exc:
            ours.close()
            raise ChildError(f"the zygote (process {self.pid}) is gone ({type(exc).__name__})") from None
        finally:
            theirs.close()
        try:
            ok, info = _recv(ours)
        except (OSError, EOFError):
            ours.close()
            raise ChildError(f"process {pid} died while starting") from None
        if not ok:
            ours.close()
            raise ChildError(f"process {pid} could not start: {info}")
        return Child(ours, pid, info)

    def close(self) -> None:
        """The zygote exits (its children live on until their own sockets close)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # also where a later fork holds a copy of the socket
            self.sock.close()
        except OSError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def process_memory_mb(pid: int) -> dict | None:
    """Memory of process ``pid`` (Linux ``/proc/PID/smaps_rollup``), MiB: ``rss`` (every page it maps),
    ``pss`` (shared pages divided among their sharers), ``private`` (pages of its own: what its exit frees).
    None where unreadable (another OS, or the process ended)."""
    try:
        text = open(f"/proc/{pid}/smaps_rollup").read()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            kb[parts[0][:-1]] = int(parts[1])
    private = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    return {"rss": round(kb.get("Rss", 0) / 1024, 1), "pss": round(kb.get("Pss", 0) / 1024, 1),
            "private": round(private / 1024, 1)}


def can_fork(devices) -> bool:
    """Whether sessions may run in forked processes: an OS with fork and every device the CPU."""
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and all(str(d) == "cpu" for d in devices)

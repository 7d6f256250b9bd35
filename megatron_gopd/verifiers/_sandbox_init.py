"""The launcher of one sandboxed run: isolates, limits and watches a candidate program (Linux).

`code_sandbox` does not import this module: it passes its source to ``python -I -c`` with one JSON
argument (the run's spec), so the code works with any interpreter the sandbox uid can run and with
only the standard library. Three processes take part when ``spec["namespaces"]`` is true:

- the launcher (started by the verifier, in its own process group) creates new user, pid, mount,
  network, IPC, UTS and cgroup namespaces and forks
- the sandbox's pid 1, which builds a private root filesystem, forks the candidate, reaps every
  process, enforces the total memory limit and writes the verdict to the report pipe; when it exits
  the kernel kills whatever is left in the pid namespace, and its mounts (all tmpfs) vanish
- the candidate, which sets its rlimits and execs the interpreter on the program as uid
  `SANDBOX_UID` of the user namespace: not 0, so the exec drops every capability.

Without namespaces (``isolation="rlimits"``) the launcher only sets the rlimits and execs.

The report pipe carries JSON lines: ``{"error": ...}`` when setup failed, else ``{"status": <wait
status>, "memory_exceeded": bool, "peak_memory_bytes": int, "memory_watched": bool}``.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = (
    CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET
    | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
)  # fmt: skip

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# statvfs f_flag bits -> mount flags: a bind of a mount made in a more privileged namespace must
# keep these ("locked"), or the read-only remount fails with EPERM.
LOCKED_FLAGS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME,
                2048: MS_NODIRATIME, 4096: MS_RELATIME}  # fmt: skip
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, AT_RECURSIVE = 1, 2, 4, 0x8000

SANDBOX_UID = 1000
"""The candidate's uid and gid inside its user namespace (mapped to the launcher's own uid)."""

SANDBOX_DIR = "/sandbox"
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None):
    """mount(2); raises OSError naming the target."""
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    result = libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags),
                        encode(data))  # fmt: skip
    _check(result, f"mount {target}")


def write_file(path, text):
    """Write ``text`` to an existing file such as /proc/self/uid_map (one write(2))."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def report(spec, **fields):
    """One JSON line on the report pipe (best effort: the verifier may have gone)."""
    try:
        os.write(spec["report_fd"], (json.dumps(fields) + "\n").encode())
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# The private root filesystem


def bind_readonly(source, target):
    """Bind ``source`` at ``target`` read-only, nosuid, nodev; False when it cannot be done."""
    try:
        mount(source, target, None, MS_BIND)
    except OSError:
        # EINVAL: mounts below source are locked to it (e.g. a container's /etc/hosts), so only a
        # recursive bind is allowed, which must then be made read-only as a whole.
        try:
            mount(source, target, None, MS_BIND | MS_REC)
        except OSError:
            return False
        attr = ctypes.c_uint64 * 4  # struct mount_attr: set, clear, propagation, userns_fd
        attrs = attr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
        result = libc.syscall(SYS_MOUNT_SETATTR, -100, target.encode(), AT_RECURSIVE,
                              ctypes.byref(attrs), ctypes.sizeof(attrs))  # fmt: skip
        if result != 0:
            libc.umount2(target.encode(), MNT_DETACH)
            return False
        return True
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    locked = os.statvfs(target).f_flag
    flags |= sum(mount_flag for bit, mount_flag in LOCKED_FLAGS.items() if locked & bit)
    try:
        mount(None, target, None, flags)
    except OSError:
        libc.umount2(target.encode(), MNT_DETACH)
        return False
    return True


def expose(path, root):
    """Make host ``path`` visible read-only at the same place under ``root`` (links copied)."""
    target = root + path
    if os.path.islink(path):  # merged /usr: /bin -> usr/bin, /lib64 -> usr/lib64
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.readlink(path), target)
        return
    if not os.path.isdir(path) or os.path.lexists(target) and not os.path.isdir(target):
        return
    os.makedirs(target, exist_ok=True)
    bind_readonly(path, target)


def build_root(spec):
    """Private root: read-only system and interpreter directories, tmpfs for everything writable.

    Nothing of the host is writable and the host's /proc, /home, /tmp and the caller's files are
    absent. /sandbox (the working directory), /tmp, /var/tmp and /dev/shm share one tmpfs of
    ``tmpfs_bytes``, which disappears with the mount namespace.
    """
    root = spec["root_dir"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=0755")
    for path in spec["readonly_paths"]:
        expose(path, root)

    scratch = root + "/.scratch"
    os.mkdir(scratch)
    options = f"size={spec['tmpfs_bytes']},nr_inodes={spec['tmpfs_inodes']},mode=0755"
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for name, place, mode in (("work", SANDBOX_DIR, 0o755), ("tmp", "/tmp", 0o1777),
                              ("var_tmp", "/var/tmp", 0o1777), ("shm", "/dev/shm", 0o1777)):  # fmt: skip
        os.mkdir(f"{scratch}/{name}")
        os.chmod(f"{scratch}/{name}", mode)
        os.makedirs(root + place, exist_ok=True)
        mount(f"{scratch}/{name}", root + place, None, MS_BIND)
    libc.umount2(scratch.encode(), MNT_DETACH)
    os.rmdir(scratch)

    for name in DEVICES:  # bind-mounted host device nodes: a user namespace cannot mknod
        node = f"{root}/dev/{name}"
        open(node, "w").close()
        mount(f"/dev/{name}", node, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"{root}/dev/{name}")

    with open(spec["program_source"], "rb") as src, open(root + SANDBOX_DIR + "/main.py", "wb") as dst:
        dst.write(src.read())

    os.makedirs(root + "/proc", exist_ok=True)
    try:  # the pid namespace's own /proc; refused where the host's /proc is partly masked
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        proc_mounted = True
    except OSError:
        proc_mounted = False

    try:  # no nested user namespaces for the candidate (the limit is per user namespace: ours)
        write_file("/proc/sys/user/max_user_namespaces", "0")
    except OSError:
        pass

    pivot_root = SYS_PIVOT_ROOT.get(os.uname().machine)
    if pivot_root is None:
        raise OSError(f"pivot_root: syscall number unknown on {os.uname().machine}")
    old = root + "/.old"
    os.mkdir(old)
    _check(libc.syscall(pivot_root, root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", MNT_DETACH), "umount old root")  # the host tree is gone
    os.rmdir("/.old")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    libc.sethostname(b"sandbox", 7)
    return proc_mounted


# ----------------------------------------------------------------------------------------------
# The candidate


def exec_candidate(spec):
    """Set the rlimits and exec the interpreter on the program; never returns."""
    try:
        os.set_inheritable(spec["report_fd"], False)  # closed by the exec, usable if it fails
        for name, soft in spec["limits"].items():
            res = getattr(resource, name)
            current_hard = resource.getrlimit(res)[1]
            hard = soft + 1 if name == "RLIMIT_CPU" else soft  # SIGXCPU, then SIGKILL 1 s later
            if current_hard != resource.RLIM_INFINITY:
                hard = min(hard, current_hard)
            resource.setrlimit(res, (min(soft, hard), hard))
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        argv = [spec["interpreter"], "-I", "main.py"]
        os.execve(spec["interpreter"], argv, spec["env"])
    except BaseException as exc:  # noqa: BLE001 - whatever it was, the verifier must hear of it
        report(spec, error=f"cannot start {spec['interpreter']} in the sandbox: {exc}")
    os._exit(127)


# ----------------------------------------------------------------------------------------------
# Pid 1


def candidate_memory():
    """Resident anonymous and shared memory of every process here but pid 1, plus SysV shared
    memory segments of this IPC namespace (they outlive their processes), in bytes.

    Shared pages mapped by several processes count once per process (an overestimate).
    """
    total = 0
    try:
        with open("/proc/sysvipc/shm", encoding="ascii") as f:
            header = f.readline().split()
            rss = header.index("rss")
            total += sum(int(line.split()[rss]) for line in f if line.strip())
    except (OSError, ValueError, IndexError):
        pass
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == "1":
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssShmem:")):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError):  # exited while we looked
            continue
    return total


def supervise(spec, candidate, memory_watched):
    """Reap every child until the candidate exits, killing everything past the memory limit."""
    limit, poll_s = spec["memory_total_bytes"], spec["memory_poll_s"]
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    status, peak, exceeded = None, 0, False
    while status is None:
        signal.sigtimedwait([signal.SIGCHLD], poll_s)
        while True:  # pid 1 inherits every orphan: reap them all
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == candidate:
                status = wait_status
        if status is None and memory_watched:
            used = candidate_memory()
            peak = max(peak, used)
            if used > limit:
                exceeded = True
                os.kill(-1, signal.SIGKILL)  # from pid 1: every other process of the namespace
                status = os.waitpid(candidate, 0)[1]
    report(spec, status=status, memory_exceeded=exceeded, peak_memory_bytes=peak,
           memory_watched=memory_watched)  # fmt: skip


def run_pid1(spec):
    """Pid 1 of the new namespaces: build the root, start the candidate, supervise it."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        memory_watched = build_root(spec)
        os.chdir(SANDBOX_DIR)
    except Exception as exc:  # noqa: BLE001 - reported, the verifier decides
        report(spec, error=f"cannot build the sandbox filesystem: {exc}")
        os._exit(1)
    candidate = os.fork()
    if candidate == 0:
        exec_candidate(spec)
    supervise(spec, candidate, memory_watched)
    os._exit(0)  # the kernel now kills whatever is left in the pid namespace


def enter_namespaces(spec):
    """Create the namespaces and map `SANDBOX_UID` to our own uid (and gid)."""
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(NAMESPACES), "unshare")
    write_file("/proc/self/setgroups", "deny")
    write_file("/proc/self/uid_map", f"{SANDBOX_UID} {uid} 1")
    write_file("/proc/self/gid_map", f"{SANDBOX_UID} {gid} 1")


def main():
    """Entry point: ``python -I -c <this source> <spec as JSON>``."""
    spec = json.loads(sys.argv[1])
    # The verifier may die without killing us (SIGKILL, OOM): then so do we.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != spec["parent_pid"]:
        os._exit(1)
    if not spec["namespaces"]:
        exec_candidate(spec)
    try:
        enter_namespaces(spec)
    except Exception as exc:  # noqa: BLE001 - reported, the verifier decides
        report(spec, error=f"cannot create user/pid/mount/network namespaces: {exc}")
        os._exit(1)
    pid1 = os.fork()  # the first child in a new pid namespace is its pid 1
    if pid1 == 0:
        run_pid1(spec)
    os.waitpid(pid1, 0)
    os._exit(0)


if __name__ == "__main__":
    main()

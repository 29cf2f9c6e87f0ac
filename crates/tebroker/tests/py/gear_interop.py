#!/usr/bin/env python3
"""Interoperability scenarios: PyPI `gear` (Client and Worker) against a Gearman server.

Usage: gear_interop.py [--host H] --port P SCENARIO [SCENARIO ...]
       gear_interop.py --list

Every scenario drives real gear.Client / gear.Worker objects against the server and checks what
they observe. On the first mismatch the script prints `FAIL <scenario>: <what>` on stderr and
exits 1; on success it prints `PASS <scenario>` for each scenario and `OK` last.

The expectations are tebroker's rules (see issue 2). They are those of gearmand for everything
but one: a worker that disconnects while running a *foreground* job makes the job fail to its
clients (geard's rule); gearmand re-queues it instead, so `worker_disconnect_fg` fails there.
geard does not answer OPTION_REQ, `show jobs`, `show unique jobs`, `version` or `cancel job`.
"""

import argparse
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
import traceback
import uuid

import gear

TIMEOUT = 10.0


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def check_eq(got, want, what):
    if got != want:
        raise Fail("%s: expected %r, got %r" % (what, want, got))


def wait_for(pred, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            raise Fail("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(0.01)


def uniq(prefix):
    return "%s_%s" % (prefix, uuid.uuid4().hex[:10])


class EchoClient(gear.Client):
    """gear.Client whose ECHO_RES answers are recorded (gear's own Connection.echo() calls
    notifyAll() on an unlocked condition under Python 3 and so never returns)."""

    def __init__(self, client_id):
        self.echoes = []
        super().__init__(client_id)

    def handleEchoRes(self, packet):
        self.echoes.append(packet.getArgument(0, True))

    def echo(self, data):
        self.getConnection().sendEchoReq(data)
        wait_for(lambda: data in self.echoes, "ECHO_RES %r" % data)


def nodelay(obj):
    """gear never sets TCP_NODELAY, so every request/answer pair on a reused connection waits
    ~40 ms for a delayed ACK. Set it on the (already connected) sockets to keep the tests fast;
    it changes timing only, not what goes over the wire."""
    for conn in obj.active_connections:
        conn.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Ctx:
    """Creates gear objects connected to the server under test and shuts them down at the end."""

    def __init__(self, host, port):
        self.host = host
        self.port = port
        self.objs = []

    def client(self, client_id="interop-client"):
        c = EchoClient(client_id)
        c.addServer(self.host, self.port)
        c.waitForServer(TIMEOUT)
        nodelay(c)
        self.objs.append(c)
        return c

    def worker(self, client_id, functions=(), timeouts=None):
        w = gear.Worker(client_id)
        w.addServer(self.host, self.port)
        w.waitForServer(TIMEOUT)
        nodelay(w)
        for f in functions:
            t = (timeouts or {}).get(f)
            w.registerFunction(f, timeout=t)
        self.objs.append(w)
        return w

    def drop(self, obj):
        """Shuts a client or worker down now: its connection closes."""
        if obj in self.objs:
            self.objs.remove(obj)
        obj.shutdown()

    def close(self):
        for o in reversed(self.objs):
            try:
                o.shutdown()
            except Exception:
                pass
        self.objs = []


def get_job(worker, timeout=TIMEOUT, what="a job"):
    """worker.getJob() with a timeout (getJob itself blocks forever)."""
    q = queue.Queue()

    def run():
        try:
            q.put(worker.getJob())
        except Exception as e:  # InterruptedError on shutdown
            q.put(e)

    threading.Thread(target=run, daemon=True).start()
    try:
        r = q.get(timeout=timeout)
    except queue.Empty:
        raise Fail("worker got no job within %.0fs (waiting for %s)" % (timeout, what))
    if isinstance(r, Exception):
        raise Fail("getJob raised %r while waiting for %s" % (r, what))
    return r


def serve_forever(worker, handler):
    """Runs handler(job) for every job the worker gets, in a daemon thread, until shutdown."""
    errors = []

    def run():
        while True:
            try:
                job = worker.getJob()
            except Exception:
                return
            try:
                handler(job)
            except Exception as e:
                errors.append(e)

    threading.Thread(target=run, daemon=True).start()
    return errors


def wait_done(job, what):
    wait_for(lambda: job.complete, "%s to complete (handle %r)" % (what, job.handle))


def submit(client, name, args, unique=None, background=False, precedence=gear.PRECEDENCE_NORMAL):
    job = gear.Job(name, args, unique=unique)
    client.submitJob(job, background=background, precedence=precedence, timeout=TIMEOUT)
    check(job.handle, "no job handle for %s" % name)
    return job


# ---------------------------------------------------------------------------------------------
# Admin protocol through gear's own admin request classes.


def admin(client, req):
    conn = client.getConnection()
    try:
        conn.sendAdminRequest(req, timeout=TIMEOUT)
    except gear.TimeoutError:
        raise Fail("no complete answer to admin command %r within %.0fs" % (req.command, TIMEOUT))
    return req.response.decode("utf-8", "replace")


def block_lines(text, what):
    lines = text.replace("\r\n", "\n").split("\n")
    check(lines and lines[-1] == "", "%s: answer does not end with a newline: %r" % (what, text))
    lines = lines[:-1]
    check(lines and lines[-1] == ".", "%s: answer does not end with a '.' line: %r" % (what, text))
    return lines[:-1]


def parse_status(text):
    """`status`: FUNCTION\\tTOTAL\\tRUNNING\\tAVAILABLE_WORKERS lines, then `.`."""
    out = {}
    for line in block_lines(text, "status"):
        parts = line.split("\t")
        check(len(parts) == 4, "status line has %d tab-separated fields, want 4: %r" % (len(parts), line))
        try:
            out[parts[0]] = tuple(int(x) for x in parts[1:])
        except ValueError:
            raise Fail("status line has non-numeric counts: %r" % line)
    return out


WORKER_LINE = re.compile(r"^(\S+) (\S+) (\S+) :(.*)$")


def parse_workers(text):
    """`workers`: FD IP CLIENT_ID : FUNCTION ... lines, then `.`."""
    out = []
    for line in block_lines(text, "workers"):
        m = WORKER_LINE.match(line)
        check(m, "workers line not in 'FD IP CLIENT-ID : FUNCTIONS' form: %r" % line)
        out.append((m.group(1), m.group(2), m.group(3), sorted(m.group(4).split())))
    return out


def status_of(client, fn):
    return parse_status(admin(client, gear.StatusAdminRequest())).get(fn)


def wait_status(client, fn, want, what):
    seen = []

    def ok():
        seen.append(status_of(client, fn))
        return seen[-1] == want

    try:
        wait_for(ok, what)
    except Fail:
        raise Fail("%s: status of %s: expected %r, last seen %r" % (what, fn, want, seen[-1]))


# ---------------------------------------------------------------------------------------------
# Scenarios.


def sc_foreground(ctx):
    fn = uniq("reverse")
    w = ctx.worker("fg-worker", [fn])
    errors = serve_forever(w, lambda job: job.sendWorkComplete(job.arguments[::-1]))
    c = ctx.client()

    c.echo(b"echo-\x00-" + uuid.uuid4().hex.encode())

    payloads = [b"hello", b"a\x00b\x00\x00c\x00", b"", bytes(range(256)) * 64]
    for prec in (gear.PRECEDENCE_NORMAL, gear.PRECEDENCE_HIGH, gear.PRECEDENCE_LOW):
        for p in payloads:
            job = submit(c, fn, p, precedence=prec)
            wait_done(job, "foreground job")
            check(not job.failure, "job with %d-byte payload failed (precedence %d)" % (len(p), prec))
            want = [p[::-1]] if p else []
            check_eq(job.data, want, "result of %d-byte payload, precedence %d" % (len(p), prec))

    # Many jobs in flight on one connection: each result goes to its own handle.
    jobs = [submit(c, fn, ("job-%03d" % i).encode()) for i in range(30)]
    check_eq(len({j.handle for j in jobs}), 30, "distinct handles for 30 jobs")
    for i, j in enumerate(jobs):
        wait_done(j, "job %d of 30" % i)
        check_eq(j.data, [("job-%03d" % i).encode()[::-1]], "result of job %d" % i)
    check(not errors, "worker errors: %r" % errors)


def sc_background(ctx):
    fn = uniq("bg")
    c = ctx.client()
    jobs = [submit(c, fn, ("bg-%d" % i).encode(), background=True) for i in range(3)]
    check_eq(len({j.handle for j in jobs}), 3, "distinct handles for 3 background jobs")
    wait_status(c, fn, (3, 0, 0), "3 queued background jobs, no worker")

    w = ctx.worker("bg-worker", [fn])
    for i in range(3):
        job = get_job(w, what="background job %d" % i)
        check_eq(job.arguments, ("bg-%d" % i).encode(), "arguments of background job %d (FIFO order)" % i)
        check_eq(job.handle, jobs[i].handle, "handle of background job %d" % i)
        job.sendWorkData(b"ignored")
        job.sendWorkComplete(b"done")
    wait_status(c, fn, (0, 0, 1), "background jobs done, worker still registered")
    time.sleep(0.2)
    for j in jobs:
        check(not j.complete and j.data == [], "the submitter of a background job got results: %r" % j.data)


def sc_priority(ctx):
    fn = uniq("prio")
    c = ctx.client()
    order = [("l1", gear.PRECEDENCE_LOW), ("n1", gear.PRECEDENCE_NORMAL), ("h1", gear.PRECEDENCE_HIGH),
             ("n2", gear.PRECEDENCE_NORMAL), ("l2", gear.PRECEDENCE_LOW), ("h2", gear.PRECEDENCE_HIGH)]
    for name, prec in order:
        submit(c, fn, name.encode(), background=True, precedence=prec)
    wait_status(c, fn, (6, 0, 0), "6 queued jobs")
    w = ctx.worker("prio-worker", [fn])
    got = []
    for _ in order:
        job = get_job(w, what="queued job")
        got.append(job.arguments.decode())
        job.sendWorkComplete()
    check_eq(got, ["h1", "h2", "n1", "n2", "l1", "l2"], "order jobs were handed out")


def sc_data_status(ctx):
    fn = uniq("progress")
    w = ctx.worker("progress-worker", [fn])
    c = ctx.client()
    job = submit(c, fn, b"go")
    wjob = get_job(w)
    check_eq(wjob.arguments, b"go", "worker's arguments")

    wjob.sendWorkData(b"part1")
    wait_for(lambda: job.data == [b"part1"], "WORK_DATA part1 at the client (saw %r)" % (job.data,))
    wjob.sendWorkStatus(1, 2)
    wait_for(lambda: job.numerator == b"1", "WORK_STATUS 1/2 at the client")
    check_eq((job.numerator, job.denominator), (b"1", b"2"), "status at the client")
    check(not job.complete, "job complete before WORK_COMPLETE")
    wjob.sendWorkWarning(b"warn")
    wait_for(lambda: job.warning, "WORK_WARNING at the client")
    wjob.sendWorkData(b"part\x002")
    wjob.sendWorkStatus(2, 2)
    wjob.sendWorkComplete(b"done")
    wait_done(job, "job")
    check(not job.failure, "job failed")
    check_eq(job.data, [b"part1", b"warn", b"part\x002", b"done"], "data chunks at the client, in order")
    check_eq((job.numerator, job.denominator), (b"2", b"2"), "final status at the client")


def sc_exceptions(ctx):
    fn = uniq("raises")
    w = ctx.worker("exc-worker", [fn])

    c = ctx.client("exc-client")
    check(c.setOption("exceptions", timeout=TIMEOUT), "OPTION_REQ exceptions was not accepted")

    job = submit(c, fn, b"x")
    wjob = get_job(w)
    wjob.sendWorkException(b"boom: it broke")
    wait_done(job, "job ending in WORK_EXCEPTION")
    check(job.failure, "a job ending in WORK_EXCEPTION is not a failure at the client")
    check_eq(job.exception, b"boom: it broke", "exception text at a client with the exceptions option")

    # What a client without the option gets differs by server (tebroker and geard: the
    # exception; gearmand: WORK_FAIL): tests/work_exception.rs checks each.

    job3 = submit(c, fn, b"z")
    wjob = get_job(w)
    wjob.sendWorkFail()
    wait_done(job3, "job ending in WORK_FAIL")
    check(job3.failure, "WORK_FAIL is not a failure at the client")
    check_eq((job3.exception, job3.data), (None, []), "exception/data after WORK_FAIL")


def sc_unique(ctx):
    fn = uniq("coalesce")
    w = ctx.worker("uniq-worker", [fn])
    a = ctx.client("client-a")
    b = ctx.client("client-b")
    key = uniq("key")

    ja = submit(a, fn, b"payload", unique=key)
    wjob = get_job(w, what="the first job")
    check_eq(wjob.unique, key.encode(), "unique id seen by the worker")
    check_eq(wjob.arguments, b"payload", "arguments seen by the worker")

    jb = submit(b, fn, b"payload", unique=key)
    check_eq(jb.handle, ja.handle, "handle of a coalesced submit (same function and unique)")
    wait_status(a, fn, (1, 1, 1), "one running job for two clients")

    wjob.sendWorkData(b"partial")
    wait_for(lambda: ja.data == [b"partial"] and jb.data == [b"partial"],
             "WORK_DATA at both attached clients (a=%r b=%r)" % (ja.data, jb.data))
    wjob.sendWorkComplete(b"result")
    wait_done(ja, "first client's job")
    wait_done(jb, "coalesced client's job")
    for name, j in (("a", ja), ("b", jb)):
        check(not j.failure, "client %s: job failed" % name)
        check_eq(j.data, [b"partial", b"result"], "client %s: data" % name)
    wait_status(a, fn, (0, 0, 1), "no job left after the coalesced job completed")

    # Once finished, the unique id is free again: a new submit runs a new job.
    jc = submit(a, fn, b"again", unique=key)
    wjob = get_job(w, what="a fresh job with a unique id that finished earlier")
    check_eq(wjob.arguments, b"again", "arguments of the fresh job")
    wjob.sendWorkComplete(b"second")
    wait_done(jc, "fresh job")
    check_eq(jc.data, [b"second"], "data of the fresh job")

    # Different unique ids do not coalesce.
    j1 = submit(a, fn, b"p", unique=uniq("k1"))
    j2 = submit(b, fn, b"p", unique=uniq("k2"))
    check(j1.handle != j2.handle, "two different unique ids got the same handle")
    for _ in range(2):
        wj = get_job(w)
        wj.sendWorkComplete(wj.unique)
    wait_done(j1, "job k1")
    wait_done(j2, "job k2")
    check(j1.data != j2.data, "two different unique ids got the same result")


def get_status(client_job, handle=None):
    """Sends GET_STATUS on the connection the job was submitted on; waits for STATUS_RES."""
    conn = client_job.connection
    if handle is not None:
        client_job.handle = handle
        conn.related_jobs[handle] = client_job
    client_job.known = None
    client_job.running = None
    client_job.numerator = None
    client_job.denominator = None
    conn.sendPacket(gear.Packet(gear.constants.REQ, gear.constants.GET_STATUS, client_job.handle))
    wait_for(lambda: client_job.known is not None, "STATUS_RES for %r" % client_job.handle)
    return (client_job.known, client_job.running, client_job.numerator, client_job.denominator)


def sc_get_status(ctx):
    fn = uniq("status")
    c = ctx.client()

    queued = submit(c, fn, b"q", background=True)
    check_eq(get_status(queued), (True, False, b"0", b"0"), "STATUS_RES of a queued background job")

    w = ctx.worker("status-worker", [fn])
    wjob = get_job(w)
    check_eq(wjob.handle, queued.handle, "handle of the grabbed job")
    check_eq(get_status(queued)[:2], (True, True), "STATUS_RES known/running of a running job")
    wjob.sendWorkStatus(3, 7)
    wait_for(lambda: get_status(queued) == (True, True, b"3", b"7"),
             "STATUS_RES 1 1 3 7 after WORK_STATUS 3/7 (last %r)" % ((queued.known, queued.running, queued.numerator, queued.denominator),))
    wjob.sendWorkComplete()
    wait_for(lambda: get_status(queued)[:2] == (False, False), "STATUS_RES unknown after completion")

    ghost = gear.Job(fn, b"")
    ghost.connection = queued.connection
    check_eq(get_status(ghost, handle=b"H:no-such-host:424242"), (False, False, b"0", b"0"),
             "STATUS_RES of an unknown handle")


def sc_admin_status_workers(ctx):
    fa, fb, fq = uniq("adm_a"), uniq("adm_b"), uniq("adm_q")
    worker_id = uniq("gearworker")
    c = ctx.client()
    ctx.worker(worker_id, [fa, fb])
    submit(c, fq, b"1", background=True)
    submit(c, fq, b"2", background=True)

    def status_ok():
        s = parse_status(admin(c, gear.StatusAdminRequest()))
        return s.get(fa) == (0, 0, 1) and s.get(fb) == (0, 0, 1) and s.get(fq) == (2, 0, 0)

    try:
        wait_for(status_ok, "status to show the worker's functions and 2 queued jobs")
    except Fail:
        raise Fail("status output: %r" % admin(c, gear.StatusAdminRequest()))

    workers = parse_workers(admin(c, gear.WorkersAdminRequest()))
    mine = [x for x in workers if x[2] == worker_id]
    check_eq(len(mine), 1, "workers lines with client id %s in %r" % (worker_id, workers))
    fd, ip, _, funcs = mine[0]
    check_eq(funcs, sorted([fa, fb]), "functions of the worker in `workers`")
    check_eq(ip, "127.0.0.1", "worker's address in `workers`")
    check(re.match(r"^\S+$", fd), "fd column %r" % fd)
    check(any(x[3] == [] for x in workers), "the client's connection (no functions) is not listed: %r" % workers)


def sc_admin_jobs(ctx):
    fq = uniq("adm_jobs")
    key = uniq("ukey")
    c = ctx.client()
    j1 = submit(c, fq, b"1", background=True, unique=key)
    j2 = submit(c, fq, b"2", background=True)

    version = admin(c, gear.VersionAdminRequest())
    check(re.match(r"^OK \S+", version), "version answer %r" % version)

    lines = block_lines(admin(c, gear.ShowJobsAdminRequest()), "show jobs")
    rows = {l.split("\t")[0]: l.split("\t") for l in lines}
    for j in (j1, j2):
        h = j.handle.decode()
        check(h in rows, "show jobs does not list %s: %r" % (h, lines))
        check_eq(len(rows[h]), 4, "fields of show jobs line %r" % rows[h])

    uniques = block_lines(admin(c, gear.ShowUniqueJobsAdminRequest()), "show unique jobs")
    check(key in uniques, "show unique jobs does not list %s: %r" % (key, uniques))

    ans = admin(c, gear.CancelJobAdminRequest(j2.handle))
    check_eq(ans.strip(), "OK", "answer to cancel job %s" % j2.handle)
    wait_status(c, fq, (1, 0, 0), "one job left after cancel job")
    lines = block_lines(admin(c, gear.ShowJobsAdminRequest()), "show jobs")
    check(not any(l.startswith(j2.handle.decode() + "\t") for l in lines), "cancelled job still in show jobs: %r" % lines)
    ans = admin(c, gear.CancelJobAdminRequest(b"H:nowhere:999999"))
    check(ans.startswith("ERR "), "answer to cancel job of an unknown handle: %r" % ans)


def sc_worker_disconnect_fg(ctx):
    fn = uniq("dies")
    key = uniq("shared")
    w = ctx.worker("doomed-worker", [fn])
    c = ctx.client()
    c2 = ctx.client("attached-client")
    job = submit(c, fn, b"x", unique=key)
    wjob = get_job(w)
    attached = submit(c2, fn, b"x", unique=key)
    check_eq(attached.handle, job.handle, "handle of the coalesced submit")
    wjob.sendWorkData(b"before-death")
    wait_for(lambda: job.data == [b"before-death"] and attached.data == [b"before-death"],
             "WORK_DATA at both clients before the worker dies")
    ctx.drop(w)
    for name, j in (("submitter", job), ("attached client", attached)):
        wait_done(j, "%s's foreground job whose worker disconnected (expected WORK_FAIL, not a requeue)" % name)
        check(j.failure, "%s: job of a disconnected worker did not fail" % name)
        check_eq(j.exception, None, "%s: exception of the failed job" % name)
    # Not re-queued: a new worker for the function gets nothing.
    w2 = ctx.worker("next-worker", [fn])
    wait_status(c, fn, (0, 0, 1), "no job left for the function after the failure")
    del w2


def sc_worker_disconnect_bg(ctx):
    fn = uniq("bgdies")
    c = ctx.client()
    job = submit(c, fn, b"must-not-be-lost", background=True)
    other = submit(c, fn, b"second", background=True)
    w1 = ctx.worker("doomed-bg-worker", [fn])
    wjob = get_job(w1)
    check_eq(wjob.handle, job.handle, "first job handed out")
    ctx.drop(w1)
    wait_status(c, fn, (2, 0, 0), "the background job back in the queue after its worker died")
    w2 = ctx.worker("rescue-worker", [fn])
    again = get_job(w2, what="the re-queued background job")
    check_eq((again.handle, again.arguments), (job.handle, b"must-not-be-lost"),
             "job handed out after the requeue (must be the lost one, at the head of its queue)")
    again.sendWorkComplete()
    nxt = get_job(w2)
    check_eq(nxt.handle, other.handle, "second background job")
    nxt.sendWorkComplete()
    wait_status(c, fn, (0, 0, 1), "no job left")


def sc_client_disconnect(ctx):
    fn = uniq("orphan")
    c1 = ctx.client("leaving-client")
    submit(c1, fn, b"queued-orphan")
    watcher = ctx.client("watcher")
    wait_status(watcher, fn, (1, 0, 0), "the foreground job queued")
    ctx.drop(c1)
    wait_for(lambda: (status_of(watcher, fn) or (0,))[0] == 0,
             "the queued foreground job of a disconnected client to be dropped (status %r)" % (status_of(watcher, fn),))

    # A running job whose client left: the worker's results are discarded, nothing breaks.
    c2 = ctx.client("leaving-client-2")
    submit(c2, fn, b"running-orphan")
    w = ctx.worker("orphan-worker", [fn])
    wjob = get_job(w)
    check_eq(wjob.arguments, b"running-orphan", "job handed out")
    ctx.drop(c2)
    time.sleep(0.2)
    wjob.sendWorkData(b"nobody listens")
    wjob.sendWorkComplete(b"ignored")
    wait_status(watcher, fn, (0, 0, 1), "no job left after the orphaned job completed")

    c3 = ctx.client("next-client")
    j = submit(c3, fn, b"next")
    wjob = get_job(w, what="the next job after an orphaned one")
    wjob.sendWorkComplete(b"fine")
    wait_done(j, "next job")
    check_eq(j.data, [b"fine"], "data of the next job")


def sc_can_do_timeout(ctx):
    fn = uniq("slow")
    w = ctx.worker("timeout-worker", [fn], timeouts={fn: b"1"})
    c = ctx.client()
    job = submit(c, fn, b"x")
    get_job(w)
    t0 = time.monotonic()
    wait_done(job, "a job exceeding CAN_DO_TIMEOUT 1s to fail")
    check(job.failure, "job exceeding CAN_DO_TIMEOUT did not fail")
    check(time.monotonic() - t0 >= 0.5, "job failed %.2fs after being grabbed, before its 1s timeout" % (time.monotonic() - t0))


SCENARIOS = {
    "foreground": sc_foreground,
    "background": sc_background,
    "priority": sc_priority,
    "data_status": sc_data_status,
    "exceptions": sc_exceptions,
    "unique": sc_unique,
    "get_status": sc_get_status,
    "admin_status_workers": sc_admin_status_workers,
    "admin_jobs": sc_admin_jobs,
    "worker_disconnect_fg": sc_worker_disconnect_fg,
    "worker_disconnect_bg": sc_worker_disconnect_bg,
    "client_disconnect": sc_client_disconnect,
    "can_do_timeout": sc_can_do_timeout,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--debug", action="store_true", help="gear's debug logging on stderr")
    ap.add_argument("scenarios", nargs="*")
    args = ap.parse_args()
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    if args.port is None or not args.scenarios:
        ap.error("--port and at least one scenario are required")
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        ap.error("unknown scenario(s) %s; known: %s" % (", ".join(unknown), ", ".join(SCENARIOS)))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    for name in args.scenarios:
        ctx = Ctx(args.host, args.port)
        t0 = time.monotonic()
        try:
            SCENARIOS[name](ctx)
        except Fail as e:
            print("FAIL %s: %s" % (name, e), file=sys.stderr, flush=True)
            os._exit(1)
        except Exception:
            print("FAIL %s: unexpected exception:\n%s" % (name, traceback.format_exc()), file=sys.stderr, flush=True)
            os._exit(1)
        ctx.close()
        print("PASS %s (%.2fs)" % (name, time.monotonic() - t0), flush=True)
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

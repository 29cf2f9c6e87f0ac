#!/usr/bin/env python3
"""A small testenv-worker written with PyPI gear, for the interoperability tests.

It speaks the TripleO CI testenv protocol as the original worker did: register `lockenv`; on a
request, call back the client's `callback_name` function with the TE data (DATAFILE's content,
or "Couldn't retrieve env: ..." when it is unreadable or not JSON); hold the TE until that
callback job ends or `timeout - 40` seconds pass; then complete `lockenv`. Static form only.

Prints `READY` once registered, then `LEASE start <callback> <job_identifier>` and
`LEASE end <complete|failed|timeout>` for each lease, on stdout.
"""

import argparse
import json
import sys

import gear

from te_common import WaitingClient, add_servers, text


def main():
    p = argparse.ArgumentParser()
    p.add_argument('datafile')
    p.add_argument('-b', '--geard', default='127.0.0.1:4730')
    p.add_argument('-n', '--tenum', default='py')
    p.add_argument('-t', '--timeout', type=int, default=10800)
    p.add_argument('--once', action='store_true')
    opts = p.parse_args()

    worker = gear.Worker('testenv-worker-%s' % opts.tenum)
    add_servers(worker, opts.geard)
    worker.waitForServer()
    worker.registerFunction('lockenv')
    print('READY', flush=True)
    while True:
        job = worker.getJob()
        request = json.loads(text(job.arguments))
        callback = request['callback_name']
        try:
            hold = max(int(request.get('timeout') or opts.timeout) - 40, 1)
        except ValueError:
            hold = max(opts.timeout - 40, 1)
        try:
            with open(opts.datafile) as f:
                data = f.read()
            json.loads(data)
        except Exception as e:  # the client is told, as the original did
            data = "Couldn't retrieve env: %s" % e
        print('LEASE start %s %s' % (callback, request.get('job_identifier', '')), flush=True)

        client = WaitingClient('testenv-worker-%s-callback' % opts.tenum)
        add_servers(client, opts.geard)
        client.waitForServer()
        cb = gear.Job(callback, data.encode())
        client.submitJob(cb)
        client.ended.wait(hold)
        if cb.failure:
            outcome = 'failed'
        elif cb.complete:
            outcome = 'complete'
        else:
            outcome = 'timeout'
        client.shutdown()
        job.sendWorkComplete(b'')
        print('LEASE end %s' % outcome, flush=True)
        if opts.once:
            break
    worker.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())

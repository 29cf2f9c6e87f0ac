"""Shared bits of the gear-based testenv agents used by the interoperability tests."""

import os
import threading

import gear


def add_servers(obj, spec):
    """Adds every `host[:port]` of a comma-separated list (port 4730 by default), over TLS
    when TE_SSL_CA is set (with TE_SSL_CERT and TE_SSL_KEY: gear's addServer arguments)."""
    tls = {
        'ssl_key': os.environ.get('TE_SSL_KEY'),
        'ssl_cert': os.environ.get('TE_SSL_CERT'),
        'ssl_ca': os.environ.get('TE_SSL_CA'),
    }
    for item in spec.split(','):
        host, sep, port = item.rpartition(':')
        if not sep:
            host, port = item, '4730'
        obj.addServer(host, int(port), **tls)


class WaitingClient(gear.Client):
    """A gear client that can wait for its (single) foreground job to end."""

    def __init__(self, client_id):
        super().__init__(client_id)
        self.ended = threading.Event()

    def handleWorkComplete(self, packet):
        job = super().handleWorkComplete(packet)
        self.ended.set()
        return job

    def handleWorkFail(self, packet):
        job = super().handleWorkFail(packet)
        self.ended.set()
        return job

    def handleWorkException(self, packet):
        job = super().handleWorkException(packet)
        self.ended.set()
        return job


def text(data):
    return data.decode('utf-8', 'replace') if isinstance(data, bytes) else data

"""Where a server command listens: the `--host` and `--port` checks that `fmnist demo` and `fmnist serve` share,
each a one-line refusal before anything is loaded or started."""

import errno
import ipaddress
import re
import socket

from fmnist_lightning.errors import UserError

# A host name: dot-separated labels of letters, digits and inner hyphens (RFC 1123).
HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}$){HOST_LABEL}(\.{HOST_LABEL})*")


def host_family(host: str) -> socket.AddressFamily:
    """The address family to serve `host` on; a value that is no IP address or host name is refused."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        pass
    numeric = all(label.isdigit() for label in host.split("."))  # 999.1.2.3 is a bad address, not a name
    if not HOST_NAME.fullmatch(host) or numeric:
        raise UserError(
            f"--host {host!r} is not an address to serve on; give an IP address such as 127.0.0.1 (this machine "
            "only) or 0.0.0.0 (every network), or a host name"
        )
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: {error.strerror}; give an IP address such as 127.0.0.1") from None


def ensure_port_free(host: str, port: int) -> None:
    """Refuse a host that is no address of this machine, or a port already in use, before anything starts."""
    with socket.socket(host_family(host)) as probe:
        # As the servers bind: a port whose last connections are still closing (TIME_WAIT) is free to them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                hint = f"--host {host} is not an address of this machine; give 127.0.0.1 or 0.0.0.0"
            elif error.errno == errno.EACCES:
                hint = "ports below 1024 need root; choose another --port"
            else:
                hint = "choose another --port"
            raise UserError(f"cannot serve on {host}:{port}: {error.strerror}; {hint}") from None


def check_port(port: int, lowest: int = 1) -> None:
    """Refuse a port number outside lowest..65535 (LitServe itself serves on 1024 and above only)."""
    if not lowest <= port <= 65535:
        raise UserError(f"--port must be between {lowest} and 65535, got {port}")


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.x, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

"""No network: importing routelab.queries, fitting every router and evaluating run with sockets blocked."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from routelab.queries.experiment import DEFAULT_ROUTERS


class NetworkUsed(AssertionError):
    pass


def test_full_fit_and_evaluate_with_sockets_blocked(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise NetworkUsed(f"network access attempted: {args[1:] if args else kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(NetworkUsed):  # the block is live
        socket.create_connection(("example.com", 80))

    from routelab.queries.experiment import QueryExperiment, RouterSpec, run_query_experiment

    config = QueryExperiment(datasets=["routellm-mt-bench"], routers=[RouterSpec(r) for r in DEFAULT_ROUTERS],
                             seeds=[0], out_dir=str(tmp_path))
    result = run_query_experiment(config, show_progress=False)
    assert {row["router"] for row in result["rows"]} == set(DEFAULT_ROUTERS)
    assert result["report"].is_file()


def test_import_and_list_in_a_fresh_process_without_network():
    script = textwrap.dedent("""
        import socket
        def refuse(*a, **k):
            raise SystemExit("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import routelab.queries
        from routelab.queries import list_datasets, list_query_routers
        assert len(list_datasets()) == 5 and len(list_query_routers()) >= 12
        print("offline ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "offline ok" in result.stdout

"""Operating a running cluster from outside its script: the control port, the CLI on it (tables,
--json, exit codes), the dashboard's API and /metrics, and the dashboard in a real browser."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import start_daemon, wait_for
from pyorchestrate import ControlClient, ControlError
from pyorchestrate.keys import KeyDir

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyorchestrate", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def two_workers(cluster, **settings):
    orch, events = start_daemon(cluster, ("w1",), ("w2",), min_workers=2, **settings)
    from agents import Boom, Forever

    orch.register_agent(Forever, "alpha")
    orch.register_agent(Forever, "beta", restart="on-failure")  # drain moves it (one that never restarts stays)
    orch.register_agent(Boom, "broken")
    events.wait("AGENT_READY", "alpha")
    events.wait("AGENT_READY", "beta")
    events.wait("AGENT_TERMINATED", "broken")
    return orch, events


def test_cli_reads_and_acts_on_a_running_cluster(cluster):
    orch, events = two_workers(cluster)
    env = {"PYORCHESTRATE_ADDRESS": orch.address}

    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    assert s["agents"]["by_state"] == {"READY": 2, "TERMINATED": 1} and s["workers"]["by_state"] == {"alive": 2}
    assert s["agents"]["with_errors"][0]["name"] == "broken" and "boom from agent" in s["agents"]["with_errors"][0]["last_error"]
    assert s["addresses"]["events"] == orch.events_address
    # this test process's descriptors (the coordinator runs in it) and its raised soft limit
    assert 0 < s["open_files"]["open"] < s["open_files"]["limit"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    table = cli("status", env=env)
    assert table.returncode == 0 and "ready 2" in table.stdout and "broken" in table.stdout
    assert re.search(r"  files \d+ of \d+\n", table.stdout), table.stdout
    assert s["pulse_running"] and "  pulse on  " in table.stdout

    rows = json.loads(cli("ps", "--json", env=env).stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("alpha", "READY"), ("beta", "READY"), ("broken", "TERMINATED")]
    assert {r["worker"] for r in rows[:2]} <= {"w1", "w2"} and rows[0]["uptime"] >= 0
    ps = cli("agents", "--state", "ready", env=env)  # the alias, a filter
    assert ps.returncode == 0 and "alpha" in ps.stdout and "broken" not in ps.stdout
    workers = json.loads(cli("workers", "--json", env=env).stdout)
    assert [(w["name"], w["state"]) for w in workers] == [("w1", "alive"), ("w2", "alive")]
    assert all(w["since_heartbeat"] < 5 and w["dropped"] == {} for w in workers)
    table = cli("workers", env=env).stdout
    assert "w1" in table and "DROPPED" in table

    history = json.loads(cli("history", "--agent", "broken", "--json", env=env).stdout)
    assert [h["event"] for h in history if h["event"] != "AGENT_LOG"][:1] == ["AGENT_STARTED"]
    assert any(h["event"] == "AGENT_ERROR" for h in history)
    recent = cli("history", "--since", "3600", env=env)
    assert recent.returncode == 0 and "AGENT_ERROR" in recent.stdout and "broken" in recent.stdout
    top = cli("top", "--count", "2", "--interval", "0.1", env=env)
    assert top.returncode == 0 and top.stdout.count("coordinator test") == 2, top.stdout

    stop = cli("stop", "alpha", env=env)
    assert stop.returncode == 0 and "alpha: stop requested" in stop.stdout
    events.wait("AGENT_TERMINATED", "alpha")
    assert cli("start", "alpha", "--json", env=env).returncode == 0
    events.wait("AGENT_READY", "alpha", count=2)
    assert json.loads(cli("restart", "beta", "--json", env=env).stdout) == {"done": "restart", "agent": "beta",
                                                                          "timeout": 10.0}
    events.wait("AGENT_READY", "beta", count=2)
    beta_worker = orch.status()["agents"]["beta"]["worker"]
    drain = cli("drain", beta_worker, env=env)
    assert drain.returncode == 0 and f"{beta_worker}: draining" in drain.stdout
    wait_for(lambda: orch.status()["agents"]["beta"]["worker"] not in (beta_worker, None)
             and orch.status()["agents"]["beta"]["state"] == "READY", 20, "beta to move off the drained worker")
    assert {w["name"]: w["state"] for w in json.loads(cli("workers", "--json", env=env).stdout)}.get(
        beta_worker, "gone") in ("draining", "gone")

    unknown = cli("stop", "nosuch", env=env)
    assert unknown.returncode == 1 and "unknown agent 'nosuch'" in unknown.stderr
    bad_drain = cli("drain", "nosuch", env=env)
    assert bad_drain.returncode == 1 and "no live worker named 'nosuch'" in bad_drain.stderr

    shutdown = cli("shutdown", "--json", env=env)
    assert shutdown.returncode == 0 and json.loads(shutdown.stdout)["done"] == "shutdown"
    orch.join()  # the script's join() returns: the run ended
    assert not orch.status()["agents"] or all(a["state"] == "TERMINATED" for a in orch.status()["agents"].values())


def test_cli_says_what_is_wrong(cluster):
    orch, _ = start_daemon(cluster, ("w1",))
    nothing = cli("status", "--address", "tcp://127.0.0.1:9", "--timeout", "1")
    assert nothing.returncode == 3 and "no coordinator answered at tcp://127.0.0.1:9" in nothing.stderr
    no_address = cli("ps", env={"PYORCHESTRATE_ADDRESS": ""})
    assert no_address.returncode == 2 and "--address" in no_address.stderr
    bad_address = cli("ps", "--address", "127.0.0.1:5")
    assert bad_address.returncode == 2
    wrong_port = cli("status", "--address", orch.events_address)
    assert wrong_port.returncode == 3 and "not a coordinator's control port" in wrong_port.stderr
    events_on_control = cli("events", "--address", orch.address, "--timeout", "2")
    assert events_on_control.returncode == 1
    assert f"is the coordinator's control port; its events port is {orch.events_address}" in events_on_control.stderr
    events_nothing = cli("events", "--address", "tcp://127.0.0.1:9", "--timeout", "1")
    assert events_nothing.returncode == 3 and "no coordinator answered" in events_nothing.stderr
    logs_unknown = cli("logs", "nosuch", "--address", orch.events_address)
    assert logs_unknown.returncode == 1 and "no log lines of 'nosuch'" in logs_unknown.stderr
    # before: a traceback (nan), "no coordinator answered within -1 s", nothing printed and exit 0
    for args, says in ((("status", "--timeout", "nan"), "argument --timeout: invalid seconds (> 0, or inf) value"),
                       (("status", "--timeout", "-1"), "argument --timeout"),
                       (("stop", "x", "--stop-timeout", "inf"), "argument --stop-timeout: invalid seconds (>= 0)"),
                       (("history", "--since", "-5"), "argument --since"),
                       (("history", "--limit", "-1"), "argument --limit: invalid whole number (>= 1) value"),
                       (("ps", "--state", "RUNING"), "unknown state 'RUNING': use one of PENDING, RESTARTING"),
                       # (a ValueError's words, and an OverflowError traceback, exit 1)
                       (("dashboard", "--listen", "nonsense"), "--listen 'nonsense': use HOST:PORT with a port"),
                       (("dashboard", "--listen", "127.0.0.1:99999"), "a port from 0 to 65535")):
        mistake = cli(*args, "--address", orch.address)
        assert mistake.returncode == 2 and says in mistake.stderr, (args, mistake.stderr)
    assert cli("ps", "--state", "ready", "--address", orch.address).returncode == 0  # any case
    for timeout in (float("nan"), 0, -1):  # the same from Python
        with pytest.raises(ValueError, match=r"timeout=.*: use a number of seconds > 0 \(inf: wait for ever\)"):
            ControlClient(orch.address, timeout=timeout)
    # a worker given the events port says so, and still ends on SIGTERM (cluster.close checks)
    cluster.worker(orch.events_address, "lost-soul")
    cluster.worker(orch.status()["addresses"]["bus"], "lost-bus")
    for name in ("lost-soul", "lost-bus"):
        wait_for(lambda: "not a coordinator's control port" in cluster.log_of(name), 15, f"{name}'s complaint")


def test_roles_reader_queries_admin_acts(cluster, tmp_path):
    keys = KeyDir(tmp_path / "keys")
    keys.init()
    orch, events = start_daemon(cluster, ("w1", "--keys", str(keys.path)), keys=str(keys.path))
    from agents import Forever

    orch.register_agent(Forever, "alpha")
    events.wait("AGENT_READY", "alpha")
    reader = tmp_path / "reader"
    keys.export("reader", "reader", reader)
    admin = tmp_path / "admin"
    keys.export("admin", "admin", admin)

    keyless = cli("status", "--address", orch.address, "--timeout", "3")
    assert keyless.returncode == 3 and "requires keys" in keyless.stderr
    as_reader = cli("ps", "--json", "--address", orch.address, "--keys", str(reader))
    assert as_reader.returncode == 0 and json.loads(as_reader.stdout)[0]["state"] == "READY"
    # a reader host holds no admin key: the CLI says so before asking
    refused = cli("stop", "alpha", "--address", orch.address, "--keys", str(reader))
    assert refused.returncode == 2 and "holds no admin key" in refused.stderr
    # and the coordinator refuses an action on a reader connection whatever the client does
    with ControlClient(orch.address, keys=str(reader)) as client:
        assert client.key.role == "reader"
        with pytest.raises(ControlError, match="needs an admin key"):
            client.stop("alpha")
    assert orch.status()["agents"]["alpha"]["state"] == "READY"
    # a worker key is no client key
    worker_dir = tmp_path / "workerkey"
    keys.export("worker", "worker", worker_dir)
    with ControlClient(orch.address, keys=str(worker_dir), roles=("worker",)) as client:
        with pytest.raises(ControlError, match="worker key"):
            client.status()
    done = cli("stop", "alpha", "--address", orch.address, "--keys", str(admin))
    assert done.returncode == 0, done.stderr
    events.wait("AGENT_TERMINATED", "alpha")


# ---------------------------------------------------------------- dashboard


class Dashboard:
    def __init__(self, address: str, tmp_path: Path, *extra: str) -> None:
        self.log = tmp_path / "dashboard.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "pyorchestrate", "dashboard", "--address", address,
                                      "--listen", "127.0.0.1:0", "--token", "s3cret", "--interval", "0.3", *extra],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        line = wait_for(lambda: "http://" in self.log.read_text() and self.log.read_text(), 30, "the dashboard's URL")
        self.url = line[line.index("http://"):].split()[0].split("?")[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError("the dashboard ignored SIGTERM")


@pytest.fixture
def dashboard_of(tmp_path):
    started: list[Dashboard] = []

    def start(address: str, *extra: str) -> Dashboard:
        started.append(Dashboard(address, tmp_path, *extra))
        return started[-1]

    yield start
    for d in started:
        d.close()


def test_dashboard_api_and_metrics(cluster, dashboard_of):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    orch, events = two_workers(cluster)
    dash = dashboard_of(orch.address)
    auth = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=dash.url, timeout=10) as http:
        assert http.get("/api/state").status_code == 401
        assert http.get("/metrics").status_code == 401
        wrong = http.get("/", params={"token": "wrong"})
        assert wrong.status_code == 401 and "not this dashboard's" in wrong.text
        state = wait_for(lambda: (s := http.get("/api/state", headers=auth).json())["status"] and s, 20, "state")
        assert {a["name"]: a["state"] for a in state["agents"]} == {"alpha": "READY", "beta": "READY",
                                                                    "broken": "TERMINATED"}
        assert state["can_act"] is True and "boom from agent" in next(
            a for a in wait_for(lambda: http.get("/api/state", headers=auth).json()["agents"], 5, "agents")
            if a["name"] == "broken")["last_error"]
        evs = wait_for(lambda: [e for e in http.get("/api/events", headers=auth).json() if e["event"] == "AGENT_ERROR"],
                       20, "the error event")
        assert "Traceback" in evs[0]["traceback"]

        text = http.get("/metrics", headers=auth).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        agents = {s.labels["state"]: s.value for s in families["pyorchestrate_agents"].samples}
        assert agents["READY"] == 2 and agents["TERMINATED"] == 1
        assert {s.labels["state"]: s.value for s in families["pyorchestrate_workers"].samples}["alive"] == 2
        ages = {s.labels["worker"]: s.value for s in families["pyorchestrate_worker_heartbeat_age_seconds"].samples}
        assert set(ages) == {"w1", "w2"} and all(v < 5 for v in ages.values())
        for name in ("pyorchestrate_up", "pyorchestrate_agent_restarts", "pyorchestrate_events_published",
                     "pyorchestrate_events_lost", "pyorchestrate_loop_lag_seconds", "pyorchestrate_worker_dropped"):
            assert name in families, name
        assert 0 < families["pyorchestrate_open_files"].samples[0].value \
            < families["pyorchestrate_open_files_limit"].samples[0].value

        # an action needs the token in X-Token too (a cookie alone could come from another site)
        assert http.post("/api/agents/alpha/stop", headers=auth).status_code == 403
        missing = http.post("/api/agents/nosuch/stop", headers={**auth, "X-Token": "s3cret"})
        assert missing.status_code == 409 and "unknown agent" in missing.json()["error"]
        assert http.post("/api/agents/alpha/stop", headers={**auth, "X-Token": "s3cret"}).status_code == 200
        events.wait("AGENT_TERMINATED", "alpha")
        history = http.get("/api/history", params={"agent": "alpha"}, headers=auth).json()
        assert history[-1]["event"] == "AGENT_TERMINATED"
        # a typo in a query is the asker's mistake, said as such (it was a 500, and 502 for limit=)
        for path, params in (("/api/events", {"after": "x"}), ("/api/history", {"limit": "-1"}),
                             ("/api/events", {"after": "²"}), ("/api/stream", {"after": "1.5"})):
            bad = http.get(path, params=params, headers=auth)
            assert bad.status_code == 400 and "must be a whole number" in bad.json()["error"], (path, bad.text)


def _browser():
    """Headless Chromium from the system (Debian: chromium, chromium-driver), driven by Selenium."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no browser: install one with `apt-get install chromium chromium-driver` (Debian)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_dashboard_in_a_real_browser(cluster, dashboard_of, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        orch, events = start_daemon(cluster, ("w1", "--labels", "zone=a"), ("w2", "--labels", "zone=b"), min_workers=2)
        dash = dashboard_of(orch.address)
        browser.get(dash.url + "?token=s3cret")
        # the page updates rows in place; an element read while its row is rebuilt is just read again
        wait = WebDriverWait(browser, 30, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])
        wait.until(EC.text_to_be_present_in_element((By.ID, "conn"), "live"))
        assert "token=" not in browser.current_url  # it became a cookie
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#workers tr[data-worker]")) == 2)

        from agents import Boom, FirstOnly, Forever

        orch.register_agent(Boom, "broken")
        orch.register_agent(Forever, "sampler")  # the agent appears on the page...
        state = (By.CSS_SELECTOR, 'tr[data-agent="sampler"] .state')
        wait.until(EC.text_to_be_present_in_element(state, "READY"))  # ...and goes READY
        wait.until(lambda b: any("AGENT_READY" in e.text and "sampler" in e.text
                                 for e in b.find_elements(By.CSS_SELECTOR, "#events .ev")))
        wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, 'tr[data-agent="broken"]'), "boom from agent"))
        shot = Path(os.environ.get("PYORCHESTRATE_SCREENSHOT", tmp_path / "dashboard.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        # what was dropped: an agent that takes its first message and holds it until stopped, sent
        # five; the other four wait in its inbox, are counted as unhandled at its stop, and shown as
        # a total.  (An agent that ended by itself after one was a race: under load its end could
        # reach the coordinator before the second send, which then raised, and nothing was dropped.)
        took = tmp_path / "one"
        orch.register_agent(FirstOnly, "one", FirstOnly.Config(trace=str(took)))
        events.wait("AGENT_READY", "one")
        for i in range(5):
            orch.send("one", i)
        wait_for(took.exists, 30, "one took a message")
        orch.stop_agent("one")
        events.wait("AGENT_TERMINATED", "one")

        def shown(card: str) -> str:
            return browser.find_element(By.CSS_SELECTOR, f'.card[data-card="{card}"] b').text

        wait_for(lambda: orch.status()["dropped"].get("agent_ended_with_messages") == 4, 10, "the four drops counted")

        def the_page_shows_the_counts(b) -> bool:
            status = orch.status()
            on = {w: sum(status["workers"][w]["dropped"].values()) for w in ("w1", "w2")}
            return (shown("dropped") == str(sum(status["dropped"].values()))
                    and shown("dropped on workers") == str(sum(on.values()))
                    and {w: b.find_element(By.CSS_SELECTOR, f'tr[data-worker="{w}"] .dropped').text for w in on}
                    == {w: str(n) for w, n in on.items()})

        wait.until(the_page_shows_the_counts)

        button = (By.CSS_SELECTOR, 'tr[data-agent="sampler"] button[data-op="stop"]')
        wait.until(EC.element_to_be_clickable(button)).click()  # stopped by a click
        events.wait("AGENT_TERMINATED", "sampler")
        wait.until(EC.text_to_be_present_in_element(state, "TERMINATED"))
        assert orch.status()["agents"]["sampler"]["state"] == "TERMINATED"
    finally:
        browser.quit()


def test_a_process_agents_last_log_lines_before_os_exit_arrive(cluster):
    orch, events = start_daemon(cluster, ("w1",))
    from agents import LastWords

    for i in range(3):
        orch.register_agent(LastWords, f"lw{i}")
    for i in range(3):
        events.wait("AGENT_TERMINATED", f"lw{i}")
        wait_for(lambda: [e["message"] for e in events.of("AGENT_LOG", f"lw{i}")]
                 == [f"last words {n}" for n in range(5)], 10, f"the last words of lw{i}")
    assert "exited with code 1" in events.of("AGENT_ERROR", "lw0")[0]["error_message"]


def test_events_leave_heartbeats_out_unless_asked(cluster):
    orch, events = start_daemon(cluster, ("w1",))
    from agents import Forever

    orch.register_agent(Forever, "ticker")
    events.wait("AGENT_READY", "ticker")
    quiet = cli("events", "--address", orch.events_address, "--topic", "AGENT_", "--json", "--timeout", "2.5",
                "--history")
    kinds = {json.loads(line)["event"] for line in quiet.stdout.splitlines()}
    assert quiet.returncode == 0 and "AGENT_READY" in kinds and "AGENT_HEARTBEAT" not in kinds, kinds
    beats = cli("events", "--address", orch.events_address, "--topic", "AGENT_HEARTBEAT", "--json", "--count", "2",
                "--timeout", "10")
    assert [json.loads(line)["event"] for line in beats.stdout.splitlines()] == ["AGENT_HEARTBEAT"] * 2


def test_an_agents_log_lines_come_before_its_end(cluster):
    """Lines travel on the bus, the end on the control connection: the end waits for the lines."""
    orch, events = start_daemon(cluster, ("w1",), ("w2",), min_workers=2)
    from agents import LastWords, Talker

    names = [f"t{i}" for i in range(20)]
    for name in names:
        orch.register_agent(Talker, name)
    orch.register_agent(LastWords, "lw")
    for name in names + ["lw"]:
        events.wait("AGENT_TERMINATED", name)
    with events._lock:
        seen = list(events.events)
    for name in names + ["lw"]:
        mine = [e["event"] for e in seen if e.get("agent_name") == name
                and e["event"] in ("AGENT_STARTED", "AGENT_LOG", "AGENT_TERMINATED")]
        lines = 5
        assert mine == ["AGENT_STARTED"] + ["AGENT_LOG"] * lines + ["AGENT_TERMINATED"], (name, mine)


def test_tail_hold_releases_in_order_on_arrival_or_after_the_wait():
    from pyorchestrate.tailhold import TailHold

    hold = TailHold(wait=2.0)
    hold.start("a", ("w/a", "r1"), now=10.0)
    assert hold.holds("a") and not hold.holds("b")
    hold.add("a", "TERMINATED a")
    hold.add("a", "STARTED a (restart)")
    assert hold.expired(11.9) == []
    assert hold.arrived(("w/a", "r1")) == ["TERMINATED a", "STARTED a (restart)"] and not hold.holds("a")
    assert hold.arrived(("w/a", "r1")) == []  # once
    hold.start("b", ("w/b", "r1"), now=20.0)
    hold.add("b", "TERMINATED b")
    assert hold.expired(22.0) == ["TERMINATED b"] and len(hold) == 0
    hold.start("c", ("w/c", "r1"), now=0.0)
    hold.add("c", "x")
    assert hold.everything() == ["x"] and len(hold) == 0
    # a second run's end while the first run's tail is still awaited: held behind it, freed with it
    hold.start("d", ("w/d", "r1"), now=30.0)
    hold.add("d", "TERMINATED d r1")
    hold.start("d", ("w/d", "r2"), now=30.5)
    hold.add("d", "TERMINATED d r2")
    assert hold.arrived(("w/d", "r1")) == ["TERMINATED d r1", "TERMINATED d r2"] and len(hold) == 0


def test_early_hold_keeps_a_runs_first_lines_until_its_started_is_out():
    """Bus events of a run whose STARTED report has not come yet wait, in order, at most ``limit``
    a run (beyond that they go on as they come) and at most ``wait`` seconds; released in order
    when its STARTED is published, after the wait, or at the end; none is dropped."""
    from pyorchestrate.tailhold import EarlyHold

    hold = EarlyHold(wait=2.0, limit=3)
    assert hold.add("r1", "line 1", now=10.0) and hold.add("r1", "line 2", now=10.5)
    assert hold.add("r2", "other", now=11.0)
    assert hold.expired(11.9) == []
    assert hold.started("r1") == ["line 1", "line 2"] and hold.started("r1") == []  # once
    assert hold.add("r3", "a", now=20.0) and hold.add("r3", "b", now=20.0) and hold.add("r3", "c", now=20.0)
    assert not hold.add("r3", "d", now=20.0)  # the limit: the caller sends it on at once
    assert hold.expired(12.9) == [] and hold.expired(13.0) == [("r2", "other")]
    assert hold.expired(22.0) == [("r3", "a"), ("r3", "b"), ("r3", "c")] and len(hold) == 0
    hold.add("r4", "last", now=30.0)
    assert hold.everything() == [("r4", "last")] and len(hold) == 0


def test_a_module_missing_on_the_worker_is_named_with_the_fix_for_both_agent_kinds(cluster):
    orch, events = start_daemon(cluster, ("w1",))
    from agents import NeedsModule, Quick, QuickProcess

    for name, cls in (("thread", Quick), ("process", QuickProcess)):
        orch.register_agent(cls, name, cls.Config(extra=NeedsModule()))
    for name in ("thread", "process"):
        error = events.wait("AGENT_ERROR", name)[0]["error_message"]
        assert "module 'pyorchestrate_no_such_module' is not installed on this worker: install it there" in error, error


def test_an_action_left_unanswered_says_it_may_have_been_done_and_a_query_does_not():
    """A control port that reads requests and never answers (a coordinator stalled after taking
    one): a stop that went out may have been carried out, and asked again is carried out again
    (a restart twice), so its error says to look first; a status did nothing, and says nothing of
    the kind."""
    import zmq

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    try:
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        with ControlClient(f"tcp://127.0.0.1:{port}", timeout=1.0) as client:
            for call, maybe in ((lambda: client.restart("sampler"), True), (client.status, False)):
                with pytest.raises(ControlError) as caught:
                    call()
                text = str(caught.value)
                assert "no coordinator answered" in text, text
                assert ("may have been carried out: look (pyorchestrate ps) before asking again" in text) is maybe, text
                assert silent.poll(5000), "the request never reached the silent port"
                silent.recv_multipart()
    finally:
        silent.close(linger=0)
        ctx.term()

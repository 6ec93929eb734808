"""The provisioned Grafana dashboard, checked without a broker: valid JSON laid out on
Grafana's grid, every query on the provisioned datasource and valid PromQL (promtool),
Grafana's provisioning as compose mounts it. That every query returns data from the real
exporters (and so that every metric it names exists) is
tests/integration/test_grafana_dashboard.py's."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import promtool

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "config" / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "ingest.json"
DATASOURCES_FILE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS_FILE = GRAFANA / "provisioning" / "dashboards" / "ingest.yml"
PROMETHEUS_FILE = ROOT / "config" / "prometheus" / "prometheus.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"

GRID_COLUMNS = 24  # Grafana's grid
# Grafana's `label_values(metric{selector}, label)`, the query of a template variable.
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")
# What Grafana escapes in each value of a multi-value variable inside a PromQL regex
# (its prometheusSpecialRegexEscape): the backslash doubled, since PromQL unescapes once.
_REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|\\]")


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return dashboard


def provisioned_datasource() -> dict[str, Any]:
    (datasource,) = yaml.safe_load(DATASOURCES_FILE.read_text())["datasources"]
    return dict(datasource)


def all_panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, rows and those a collapsed row holds included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels(dashboard: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The panels that query (rows and text panels do not)."""
    return [p for p in all_panels(dashboard["panels"]) if p.get("targets")]


def regex_of(values: Sequence[str]) -> str:
    """A multi-value variable as Grafana writes it into a Prometheus query: `(a|b)`, each
    value's regex characters escaped."""
    return "(" + "|".join(_REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(), v) for v in values) + ")"


def expand(expr: str, variables: Mapping[str, str], builtins: Mapping[str, str]) -> str:
    """`expr` with Grafana's variables replaced: the built-in ones (`$__rate_interval`,
    ...) and the dashboard's (already formatted, see `regex_of`). A `$` left over is a
    variable nobody defines: an error, as Grafana would send it to Prometheus as is."""
    names = {**builtins, **variables}
    for name in sorted(names, key=len, reverse=True):  # $__range before $__r...
        expr = expr.replace(f"${{{name}}}", names[name]).replace(f"${name}", names[name])
    if "$" in expr:
        raise AssertionError(f"undefined variable in {expr!r}")
    return expr


def example_expansion(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Values for every template variable, as if two were selected."""
    return {
        variable["name"]: regex_of([f"{variable['name']}-a", f"{variable['name']}.b"])
        for variable in dashboard["templating"]["list"]
    }


BUILTINS = {"__rate_interval": "20s", "__interval": "5s", "__range": "3600s"}


def test_the_dashboard_is_grafana_json_with_a_fixed_uid() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "ingest"  # the URL /d/ingest, and the home dashboard
    assert dashboard["schemaVersion"] == 39
    assert "id" not in dashboard or dashboard["id"] is None  # Grafana assigns it
    assert {p["type"] for p in all_panels(dashboard["panels"])} <= {"row", "stat", "timeseries"}


def test_every_panel_has_a_unique_id_and_a_title() -> None:
    panels = list(all_panels(load_dashboard()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert all(isinstance(i, int) and i > 0 for i in ids)
    titles = [p["title"] for p in panels]
    assert all(titles)
    assert len(titles) == len(set(titles))


def test_the_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(load_dashboard()["panels"]):
        grid = panel["gridPos"]
        assert min(grid["x"], grid["y"]) >= 0, panel["title"]
        assert min(grid["w"], grid["h"]) > 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]


def test_every_query_uses_the_provisioned_datasource() -> None:
    dashboard = load_dashboard()
    datasource = provisioned_datasource()
    expected = {"type": datasource["type"], "uid": datasource["uid"]}
    assert expected == {"type": "prometheus", "uid": "prometheus"}
    panels = query_panels(dashboard)
    assert len(panels) >= 20
    for panel in panels:
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, (panel["title"], target["refId"])
            assert target["expr"].strip(), (panel["title"], target["refId"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == expected, variable["name"]
    for annotation in dashboard["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] == expected, annotation["name"]


def test_the_pipeline_variable_lists_the_pipelines_with_all_and_multi() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    pipeline = variables["pipeline"]
    assert pipeline["query"] == "label_values(ingest_messages_received_total, pipeline)"
    assert pipeline["multi"] is True
    assert pipeline["includeAll"] is True
    for variable in variables.values():
        assert LABEL_VALUES.match(variable["query"]), variable["name"]
    # Every query of the service's own metrics follows the pipelines chosen.
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            if "ingest_" in target["expr"]:
                assert 'pipeline=~"$pipeline"' in target["expr"], (panel["title"], target["refId"])


def test_the_alerts_are_annotations() -> None:
    annotations = [
        a for a in load_dashboard()["annotations"]["list"] if not a.get("builtIn") and a["enable"]
    ]
    assert [a["expr"] for a in annotations] == ['ALERTS{alertstate="firing"}']


def test_the_datasource_is_compose_prometheus_at_its_scrape_interval() -> None:
    datasource = provisioned_datasource()
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    prometheus = yaml.safe_load(PROMETHEUS_FILE.read_text())
    # Grafana's $__rate_interval is four scrape intervals at least: it must know it.
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_compose_provisions_grafana_with_the_dashboard_as_its_home() -> None:
    grafana = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana-oss"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag)
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert "prometheus" in grafana["depends_on"]
    mounts = {
        source: target.removesuffix(":ro")
        for source, _, target in (v.partition(":") for v in grafana["volumes"])
        if source.startswith("./")
    }
    assert all(v.endswith(":ro") for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./config/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards = mounts["./config/grafana/dashboards"]
    (provider,) = yaml.safe_load(PROVIDERS_FILE.read_text())["providers"]
    assert provider["options"]["path"] == dashboards
    environment = grafana["environment"]
    assert environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards}/ingest.json"
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's expressions, the annotation's and the variables' selectors, with the
    variables expanded as Grafana does, parsed by promtool as recording rules."""
    tool = promtool()
    dashboard = load_dashboard()
    variables = example_expansion(dashboard)
    rules = []
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = expand(target["expr"], variables, BUILTINS)
            rules.append({"record": f"panel_{panel['id']}_{target['refId']}", "expr": expr})
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            rules.append({"record": "annotation", "expr": annotation["expr"]})
    for variable in dashboard["templating"]["list"]:
        match = LABEL_VALUES.match(variable["query"])
        assert match, variable["name"]
        selector = expand(match["selector"], variables, BUILTINS)
        rules.append({"record": f"variable_{variable['name']}", "expr": selector})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [tool, "check", "rules", "--lint=none", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_prometheus_config_is_valid() -> None:
    done = subprocess.run(
        [promtool(), "check", "config", "--syntax-only", str(PROMETHEUS_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_expand_formats_variables_as_grafana_does() -> None:
    variables = {"queue": regex_of(["q.dlq", "q"])}
    assert expand('x{queue=~"$queue"}[$__rate_interval]', variables, BUILTINS) == (
        'x{queue=~"(q\\\\.dlq|q)"}[20s]'
    )
    with pytest.raises(AssertionError, match="undefined variable"):
        expand("x[$nobody]", variables, BUILTINS)

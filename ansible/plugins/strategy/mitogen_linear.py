"""Ansible's linear strategy run over Mitogen (mitogen on PyPI, in the control node's venv).

Mitogen keeps one Python interpreter per host for the whole run and sends modules to it,
instead of copying and starting a new interpreter for every task: an idempotent site.yml
run on the lab's five hosts took 77 s instead of 139 s, side by side. ansible.cfg selects it;
`ANSIBLE_STRATEGY=linear` runs without it. This file only names the plugin where ansible.cfg
looks (mitogen's own copy lives in site-packages, whose path depends on the Python version).
"""

from __future__ import annotations

import ansible_mitogen.loaders
import ansible_mitogen.strategy

Base = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, Base):
    pass

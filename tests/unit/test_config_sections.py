"""load_section reads one section exactly as load_config reads it in the whole file, and
refuses what load_config refuses about that section and about the file's section names."""

from __future__ import annotations

import pytest

from gateway.audit import AuditSettings
from gateway.client import ClientSettings
from gateway.config import ServerSettings, load_config, load_section, section_classes
from gateway.errors import ConfigError
from gateway.identity import TlsSettings


def test_a_section_is_read_as_in_the_whole_config(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('[server]\nlisten = "0.0.0.0:9443"\nthreads = 8\n'
                      '[tls]\nca = "pki/ca.pem"\n'
                      '[client]\ntarget = "gw:8443"\ncert = "me.pem"\nkey = "me.key"\n'
                      '[audit]\ndirectory = "log"\ncheckpoint_records = 8\n')
    whole = load_config(config)
    for name, cls in (("server", ServerSettings), ("tls", TlsSettings),
                      ("client", ClientSettings), ("audit", AuditSettings)):
        assert load_section(config, name, cls) == getattr(whole, name)
    assert load_section(config, "tls", TlsSettings).ca == tmp_path / "pki/ca.pem"
    assert load_section(None, "audit", AuditSettings) == load_config(None).audit


def test_refuses_what_load_config_refuses(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text('[audit]\ndirectory = "log"\n[audits]\nx = 1\n')
    with pytest.raises(ConfigError, match="unknown section"):
        load_section(config, "audit", AuditSettings)
    config.write_text('[audit]\ndirectry = "log"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_section(config, "audit", AuditSettings)
    config.write_text('[audit]\ncheckpoint_records = "8"\n')
    with pytest.raises(ConfigError, match="expected int"):
        load_section(config, "audit", AuditSettings)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_section(tmp_path / "missing.toml", "audit", AuditSettings)


def test_a_section_is_read_only_into_its_own_class():
    with pytest.raises(TypeError):
        load_section(None, "tls", AuditSettings)
    with pytest.raises(TypeError):
        load_section(None, "nosuch", AuditSettings)
    assert section_classes()["audit"] is AuditSettings

"""Configuration: /etc/elemta/elemta.toml read with tomllib into frozen dataclasses.

keys.py declares every key once: its type, its default, its one-line doc and its rule
(conf/elemta.toml and elemta.toml(5) mirror them, and tests check that they agree).  parse.py reads a file into
them, reporting every problem of the file, one line each.  Everything is importable from
here: `from elemta.config import Config, load`.
"""

from elemta.config.keys import (
    _CHOICES,
    _DOCS,
    _RANGES,
    _SECTIONS,
    _TABLES,
    AUTH_MECHANISMS,
    DEFAULT_PATH,
    DESTINATION_TLS_POLICIES,
    LISTENER_ROLES,
    LOG_FACILITIES,
    LOG_FORMATS,
    LOG_LEVELS,
    LOG_TARGETS,
    MAILNAME,
    RELAYHOST_TLS_POLICIES,
    SUBMISSION_ROLES,
    TLS_POLICIES,
    TLS_ROLES,
    TLS_VERSIONS,
    Certificate,
    Config,
    DeliveryConfig,
    LimitsConfig,
    Listener,
    LocalConfig,
    LogConfig,
    MonitorConfig,
    PluginSpec,
    QueueConfig,
    ServerConfig,
    SmtpConfig,
    TlsConfig,
    key,
    mailname,
    split_host_port,
)
from elemta.config.parse import load, parse, replace

__all__ = [
    "AUTH_MECHANISMS", "DEFAULT_PATH", "DESTINATION_TLS_POLICIES", "LISTENER_ROLES", "LOG_FACILITIES",
    "LOG_FORMATS", "LOG_LEVELS", "LOG_TARGETS", "MAILNAME", "RELAYHOST_TLS_POLICIES", "SUBMISSION_ROLES",
    "TLS_POLICIES", "TLS_ROLES", "TLS_VERSIONS", "Certificate", "Config", "DeliveryConfig", "LimitsConfig",
    "Listener", "LocalConfig", "LogConfig", "MonitorConfig", "PluginSpec", "QueueConfig", "ServerConfig",
    "SmtpConfig", "TlsConfig", "_CHOICES", "_DOCS", "_RANGES", "_SECTIONS", "_TABLES", "key", "load",
    "mailname", "parse", "replace", "split_host_port",
]

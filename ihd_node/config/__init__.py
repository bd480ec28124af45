"""The node's typed configuration, read from config.yaml.

Modules: fields (value types, the strict base section), sections, outbound and web (the pydantic models),
load (reading the file, error messages), checks (what would stop `serve` on this machine, the summary),
reference (the table of docs/configuration.md). Other stages import from here.
"""

from ihd_node.config.audit import AuditConfig, SyslogTarget, parse_syslog
from ihd_node.config.checks import runtime_problems, summary
from ihd_node.config.load import ConfigError, default_config, load_config
from ihd_node.config.monitoring import MonitoringConfig
from ihd_node.config.outbound import AlertChannel, AlertsConfig, DeliveryConfig, Destination, OutboundTLS
from ihd_node.config.reference import reference_markdown
from ihd_node.config.sections import (
    AnalysisConfig,
    ClusterConfig,
    Config,
    DatabaseConfig,
    InboundTLS,
    LoggingConfig,
    ModelSection,
    NodeConfig,
    RetentionConfig,
    SeriesConfig,
    StorageConfig,
    WebAuth,
    WebConfig,
)
from ihd_node.config.web import WebOidc

__all__ = [
    "AuditConfig", "SyslogTarget", "parse_syslog",
    "AlertChannel", "AlertsConfig", "AnalysisConfig", "ClusterConfig", "Config", "ConfigError", "DatabaseConfig",
    "DeliveryConfig", "Destination", "InboundTLS", "LoggingConfig", "ModelSection", "MonitoringConfig", "NodeConfig",
    "OutboundTLS", "RetentionConfig", "SeriesConfig", "StorageConfig", "WebAuth", "WebConfig", "WebOidc",
    "default_config", "load_config",
    "reference_markdown", "runtime_problems", "summary",
]

DROP INDEX usage_metrics_minute_idx;
DROP TABLE billing_alerts;

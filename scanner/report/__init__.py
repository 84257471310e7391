"""Reports: terminal tables and JSON, SARIF 2.1.0, the HTML audit, the JSON Schema."""

"""Reporting: results saved with their settings (results), the notebook runner (notebooks), and
`snapkv reproduce` with its index page (reproduce)."""

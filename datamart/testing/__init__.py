"""Test and benchmark support: throwaway PostgreSQL servers."""

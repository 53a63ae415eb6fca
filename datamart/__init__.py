"""Declarative dlt ingestion and SQLMesh modelling for a public-service datamart."""

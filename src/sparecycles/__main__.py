from sparecycles.cli import app

app()

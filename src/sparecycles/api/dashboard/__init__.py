"""The dashboard's pages: server-rendered HTML, charts, forms and sessions."""

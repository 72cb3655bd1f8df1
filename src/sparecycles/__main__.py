from sparecycles.cli import app

if __name__ == "__main__":  # a spawned child (the node's profiler) imports this as __mp_main__
    app()

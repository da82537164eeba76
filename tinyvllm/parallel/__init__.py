"""More than one device or process: tensor_parallel.py splits one model across devices,
data_parallel.py runs N engines in processes of their own."""

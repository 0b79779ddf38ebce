"""The console's pages, one module per part of the SEPM console they follow."""

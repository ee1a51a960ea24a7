"""netadapt host side: the NetAdapt engine, device client and command-line tools."""

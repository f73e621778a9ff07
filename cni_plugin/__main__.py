from cni_plugin.shim import main

raise SystemExit(main())

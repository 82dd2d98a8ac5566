from zostream.clients.cli import main

raise SystemExit(main())

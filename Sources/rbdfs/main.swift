print("rbdfs")
